"""The one-step generator G(z, cond): the teacher's x_0 prediction at the last timestep (DMD Sec. 3.1)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .denoisers import Denoiser


class OneStepGenerator(nn.Module):
    """G(z) = mu_base(z, T - 1): pure noise z ~ N(0, I) read as x_{T-1}, one denoiser evaluation.

    Initialized as a copy of the teacher, so at step 0 it is the teacher's own one-step output.
    """

    def __init__(self, denoiser: Denoiser, timestep: int | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.timestep = denoiser.schedule.T - 1 if timestep is None else timestep

    @classmethod
    def from_teacher(cls, teacher: Denoiser, timestep: int | None = None) -> "OneStepGenerator":
        return cls(copy.deepcopy(teacher).requires_grad_(True), timestep)

    def forward(self, z: Tensor, cond=None) -> Tensor:
        t = torch.full((z.shape[0],), self.timestep, device=z.device, dtype=torch.long)
        return self.denoiser(z, t, cond)
