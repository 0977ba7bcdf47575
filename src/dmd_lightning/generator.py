"""Generators: one step, the teacher's x_0 prediction at the last timestep (DMD Sec. 3.1), or K steps at fixed
timesteps with fresh noise between them, trained by backward simulation (DMD2 Sec. 4.5)."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from dmd_lightning.denoisers import Denoiser
from dmd_lightning.errors import ConfigError
from dmd_lightning.rng import stream_seed
from dmd_lightning.schedule import VPSchedule


class OneStepGenerator(nn.Module):
    """G(z) = mu_base(z, T - 1): pure noise z ~ N(0, I) read as x_{T-1}, one denoiser evaluation.

    Initialized as a copy of the teacher, so at step 0 it is the teacher's own one-step output.
    """

    def __init__(self, denoiser: Denoiser, timestep: int | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.timestep = denoiser.schedule.T - 1 if timestep is None else timestep
        gain = error_gain(denoiser.schedule, self.timestep)
        if gain > 50:
            warnings.warn(
                f"the teacher's x0-prediction at t={self.timestep} multiplies its {denoiser.schedule.prediction_type} "
                f"error by {gain:.0f} (alpha_t = {1 / gain:.4f}): the one-step initialization will be mostly noise. "
                "Use a v-prediction teacher on a zero-terminal-SNR schedule (Lin et al. 2024; docs/teacher.md) or a "
                "schedule with larger alpha_T (scaled_linear), or read the noise at a lower `timestep`.",
                stacklevel=2,
            )

    @classmethod
    def from_teacher(cls, teacher: Denoiser, timestep: int | None = None) -> "OneStepGenerator":
        """A trainable copy of the teacher."""
        return cls(copy.deepcopy(teacher).requires_grad_(True), timestep)

    @property
    def timesteps(self) -> tuple[int, ...]:
        return (self.timestep,)

    def forward(self, z: Tensor, cond=None, generator: torch.Generator | None = None) -> Tensor:
        return self.step(z, 0, cond)

    def step(self, x_t: Tensor, k: int | Tensor, cond=None) -> Tensor:
        """x_0 from x_t at the k-th of `timesteps` (k: one step for the batch, or a LongTensor (B,), one per
        sample, best on the CPU: no device synchronisation): one denoiser evaluation."""
        if isinstance(k, Tensor):
            t = torch.tensor(self.timesteps)[k.cpu()].to(x_t.device, non_blocking=True)  # from pageable memory: no wait
        else:
            t = torch.full((x_t.shape[0],), self.timesteps[k], device=x_t.device, dtype=torch.long)
        return self.denoiser(x_t, t, cond)

    @torch.no_grad()
    def simulate(self, z: Tensor, k: int | Tensor, cond=None, generator: torch.Generator | None = None,
                 eps: list[Tensor] | None = None) -> Tensor:
        """The generator's own input at step k from noise z (DMD2's backward simulation): steps 0..k-1 run without
        gradient, each x_0 noised afresh (eps[j], else drawn from `generator`) to the next timestep. k = 0: z.
        k may be a LongTensor (B,), best on the CPU: step j then runs on the rows with k > j only, so a batch with the
        K steps in equal shares costs as many sample-evaluations as one step per batch does on average."""
        each = isinstance(k, Tensor)
        k = k.cpu() if each else k
        x = z.clone()
        for j in range((int(k.max()) if k.numel() else 0) if each else k):
            rows = (k > j).nonzero().squeeze(1).to(z.device, non_blocking=True) if each else slice(None)
            x0 = self.step(x[rows], j, cond[rows] if cond is not None else None)
            t = torch.full((x0.shape[0],), self.timesteps[j + 1], device=z.device, dtype=torch.long)
            e = eps[j] if eps is not None else torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=generator)
            x[rows] = self.denoiser.schedule.add_noise(x0, e[rows], t).to(z.dtype)
        return x


class MultiStepGenerator(OneStepGenerator):
    """G with K steps at `timesteps` (e.g. 999, 749, 499, 249; DMD2 Sec. 4.5): x_0 from pure noise at the first,
    noised afresh to the next timestep, denoised again, ... Training picks a step k and builds its input by
    running the generator itself (`simulate`, no gradient), not by noising real data; a K-step sample is
    `simulate(z, K-1)` then `step(., K-1)`."""

    def __init__(self, denoiser: Denoiser, timesteps: list[int] | tuple[int, ...] = (999, 749, 499, 249)):
        timesteps = tuple(int(t) for t in timesteps)
        if not timesteps or list(timesteps) != sorted(set(timesteps), reverse=True) or timesteps[-1] < 0 \
                or timesteps[0] >= denoiser.schedule.T:
            raise ConfigError(f"timesteps={list(timesteps)}: must be distinct, decreasing, in [0, {denoiser.schedule.T})")
        super().__init__(denoiser, timesteps[0])
        self._timesteps = timesteps

    @classmethod
    def from_teacher(cls, teacher: Denoiser, timesteps=(999, 749, 499, 249)) -> "MultiStepGenerator":
        return cls(copy.deepcopy(teacher).requires_grad_(True), timesteps)

    @property
    def timesteps(self) -> tuple[int, ...]:
        return self._timesteps

    def forward(self, z: Tensor, cond=None, generator: torch.Generator | None = None) -> Tensor:
        k = len(self.timesteps) - 1
        return self.step(self.simulate(z, k, cond, generator), k, cond)


@torch.no_grad()
def sample(generator: nn.Module, z: Tensor, cond=None, seed: int = 0, index: int = 0) -> Tensor:
    """The generator's samples from noise z: K network evaluations, the fresh noise between steps drawn from item
    `index` of `seed`'s stream (rng.stream_seed, rng.steps_seed; so validations, `dmd predict` and an exported folder
    give the same images); a generator without steps (the toy's MLP) is called directly."""
    if not hasattr(generator, "simulate"):
        return generator(z, cond)
    return generator(z, cond, torch.Generator(device=z.device).manual_seed(stream_seed("steps", seed, index)))


def error_gain(schedule: VPSchedule, t: int) -> float:
    """How much an error in the network's output grows in the x0 estimate at timestep t (1 for x0/v at t=T)."""
    alpha, sigma = (float(v) for v in schedule.alpha_sigma(torch.tensor([t])))
    kind = schedule.prediction_type
    if kind == "epsilon":
        return sigma / alpha if alpha > 0 else float("inf")
    return sigma if kind == "v_prediction" else 1.0
