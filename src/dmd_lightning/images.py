"""Image conversions shared by sampling, evaluation and the demo."""

from __future__ import annotations

import torch
from torch import Tensor


def to_uint8(x: Tensor) -> Tensor:
    """Images in [-1, 1] (any shape) -> uint8 of the same shape, rounded as diffusers' postprocessing does."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
