"""Image conversions shared by sampling, evaluation and the demo."""

from __future__ import annotations

import torch
from torch import Tensor


def to_uint8(x: Tensor) -> Tensor:
    """Images in [-1, 1] (any shape) -> uint8 of the same shape, rounded as diffusers' postprocessing does."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def log_grid(logger, tag: str, images: Tensor, step: int) -> None:
    """Samples as one grid image (8 per row) in TensorBoard; pixel-space images in [-1, 1] with 1 or 3 channels
    only (not latents); nothing without a TensorBoard logger."""
    experiment = getattr(logger, "experiment", None)
    if not hasattr(experiment, "add_image") or images.dim() != 4 or images.shape[1] not in (1, 3):
        return
    from torchvision.utils import make_grid

    grid = make_grid(((images.float() + 1) / 2).clamp(0, 1).cpu(), nrow=8, padding=2, pad_value=1.0)
    experiment.add_image(tag, grid, step)
