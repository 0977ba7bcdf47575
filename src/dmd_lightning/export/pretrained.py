"""`dmd predict` from an exported pixel folder alone (configs/exported.yaml): the generator rebuilt from the folder's
UNet, schedule and timesteps, sampled by the checkpoint's rule, so that the folder gives the checkpoint's images for
the same noise, labels and seeds."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning import LightningModule

from dmd_lightning.checks import size_pair
from dmd_lightning.denoisers import UNetDenoiser
from dmd_lightning.export.pixel import INFO
from dmd_lightning.generator import MultiStepGenerator, OneStepGenerator, sample
from dmd_lightning.loading import WeightsNotFoundError, load_pretrained
from dmd_lightning.rng import steps_seed
from dmd_lightning.schedule import VPSchedule


def load_generator(path: str | Path) -> OneStepGenerator:
    """The OneStepGenerator or MultiStepGenerator that `dmd export` wrote to `path` (a pixel-space folder)."""
    from diffusers import UNet2DModel

    info_file = Path(path) / INFO
    if not info_file.is_file():
        raise WeightsNotFoundError(f"{str(path)!r} has no {INFO}: pass a folder that `dmd export` wrote for a "
                                   "pixel-space generator (Stable Diffusion exports run with diffusers' pipeline)")
    steps = json.loads(info_file.read_text())["timesteps"]
    denoiser = UNetDenoiser(load_pretrained(UNet2DModel, str(path), "unet"),
                            load_pretrained(VPSchedule, str(path), "scheduler"))
    return MultiStepGenerator(denoiser, steps) if len(steps) > 1 else OneStepGenerator(denoiser, steps[0])


class ExportedGenerator(LightningModule):
    """The generator of a `dmd export` folder for `dmd predict`: predict_step gives what DMDModule.predict_step gives
    for the same batch (its fresh noise between steps seeded by the batch index). Tells NoiseDataModule its
    `sample_shape` and `num_classes`."""

    needs_checkpoint = False  # the weights come from `path`, not from --ckpt_path

    def __init__(self, path: str):
        super().__init__()
        self.generator = load_generator(path).requires_grad_(False).eval()
        self.path = path

    @property
    def sample_shape(self) -> tuple[int, ...]:
        config = self.generator.denoiser.unet.config
        return (config.in_channels, *size_pair(config.sample_size))

    @property
    def num_classes(self) -> int | None:
        return self.generator.denoiser.null_label  # labels 0 .. null_label - 1; None: unconditional

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return {"x": sample(self.generator, batch["z"], batch.get("cond"), *steps_seed(self, batch, batch_idx)),
                **batch}  # as DMDModule
