"""The one-step generator G(z, cond): the teacher's x_0 prediction at the last timestep (DMD Sec. 3.1)."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from .denoisers import Denoiser
from .schedule import VPSchedule


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
                "Read the noise at a lower timestep (DMDModule's generator_timestep; 400 gives 2.0 on the linear "
                "schedule), or use a v-prediction teacher or a schedule with larger alpha_T (scaled_linear).",
                stacklevel=2,
            )

    @classmethod
    def from_teacher(cls, teacher: Denoiser, timestep: int | None = None,
                     prediction_type: str | None = None) -> "OneStepGenerator":
        """A trainable copy of the teacher. `prediction_type` reads the copy's output in another
        parameterization than the teacher's (e.g. "sample": the network's output is the image itself), which
        keeps a generator from an epsilon teacher well conditioned where alpha_T is tiny (see error_gain)."""
        denoiser = copy.deepcopy(teacher).requires_grad_(True)
        if prediction_type is not None:
            denoiser.schedule = VPSchedule.from_config({**teacher.schedule.config, "prediction_type": prediction_type})
        return cls(denoiser, timestep)

    def forward(self, z: Tensor, cond=None) -> Tensor:
        t = torch.full((z.shape[0],), self.timestep, device=z.device, dtype=torch.long)
        return self.denoiser(z, t, cond)


def error_gain(schedule: VPSchedule, t: int) -> float:
    """How much an error in the network's output grows in the x0 estimate at timestep t (1 for x0/v at t=T)."""
    alpha, sigma = (float(v) for v in schedule.alpha_sigma(torch.tensor([t])))
    return {"epsilon": sigma / alpha, "v_prediction": sigma, "sample": 1.0}[schedule.prediction_type]
