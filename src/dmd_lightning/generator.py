"""The one-step generator G(z, cond): the teacher's x_0 prediction at the last timestep (DMD Sec. 3.1)."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from dmd_lightning.denoisers import Denoiser
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

    def forward(self, z: Tensor, cond=None) -> Tensor:
        t = torch.full((z.shape[0],), self.timestep, device=z.device, dtype=torch.long)
        return self.denoiser(z, t, cond)


def error_gain(schedule: VPSchedule, t: int) -> float:
    """How much an error in the network's output grows in the x0 estimate at timestep t (1 for x0/v at t=T)."""
    alpha, sigma = (float(v) for v in schedule.alpha_sigma(torch.tensor([t])))
    kind = schedule.prediction_type
    if kind == "epsilon":
        return sigma / alpha if alpha > 0 else float("inf")
    return sigma if kind == "v_prediction" else 1.0
