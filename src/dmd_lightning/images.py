"""Image conversions shared by sampling, evaluation and the demo."""

from __future__ import annotations

import torch
from lightning import Callback
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


class TeacherGrid(Callback):
    """At the first validation of a fit, the teacher's samples (deterministic `sampler`, `num_steps` steps) for the
    first validation batch's noise and labels, as `samples/teacher` in TensorBoard: the reference beside the
    generator's `samples/ema` grids of the same seeds. Once, as the teacher does not change."""

    def __init__(self, sampler: str = "ddim", num_steps: int = 50, guidance_scale: float = 1.0):
        self.sampler, self.num_steps, self.guidance_scale, self.done = sampler, num_steps, guidance_scale, False

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.done or batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        from dmd_lightning.samplers import make_scheduler, sample_ode

        teacher = pl_module.teacher
        z, cond = batch["z"][:64], batch["cond"][:64] if batch.get("cond") is not None else None
        scheduler = make_scheduler(self.sampler, teacher.schedule.config)
        x = sample_ode(teacher, z, scheduler, self.num_steps, cond, guidance_scale=self.guidance_scale)
        log_grid(pl_module.logger, "samples/teacher", x, trainer.global_step)
        self.done = True
