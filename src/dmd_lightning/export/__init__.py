"""`dmd export`: a DMDModule's (EMA) generator as a diffusers pipeline folder, by model kind.

- pixel-space UNet2DModel generators (Fashion-MNIST): `pixel.py`, a ConsistencyModelPipeline with an LCMScheduler,
  loaded by `DiffusionPipeline.from_pretrained(folder)`; `dmd predict` samples from such a folder (`pretrained.py`);
- text-conditional latent UNets (Stable Diffusion): `sd/export.py`, a StableDiffusionPipeline.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from dmd_lightning.errors import ConfigError
from dmd_lightning.generator import OneStepGenerator
from dmd_lightning.loading import DTYPES
from dmd_lightning.lora import merged


def generator_unet(generator: nn.Module) -> nn.Module:
    """The diffusers UNet inside a OneStepGenerator (or MultiStepGenerator) built on a UNet denoiser."""
    unet = getattr(getattr(generator, "denoiser", None), "unet", None)
    if not isinstance(generator, OneStepGenerator) or unet is None:
        raise ConfigError(f"dmd export needs a OneStepGenerator around a UNet denoiser, got {type(generator).__name__}")
    return unet


def is_text_conditional(generator: nn.Module) -> bool:
    return bool(getattr(generator.denoiser, "text_conditional", False))


def unet_copy(generator: nn.Module, dtype: str) -> nn.Module:
    """A CPU copy of the generator's UNet in `dtype` (float32, float16 or bfloat16), ready to save; a LoRA UNet's
    adapters are merged into its weights (lora.merged)."""
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    unet = merged(generator_unet(generator)).to("cpu", DTYPES[dtype])  # LoRA adapters merged; else a plain copy
    if unet.is_gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    return unet


def step_scheduler(schedule_config: dict, timesteps: tuple[int, ...] = ()):
    """An LCMScheduler on the teacher's schedule that takes exactly the generator's steps: at each timestep the
    UNet's x_0, noised afresh (from the pipeline's `generator`) to the next one, as MultiStepGenerator samples.

    original_inference_steps=1000 puts every integer timestep on its grid (no off-grid warning for e.g. 749);
    timestep_scaling=1e4 makes LCM's boundary scalings c_skip < 3e-9 and c_out > 1 - 3e-9 at t >= 1 (Song et al.
    2023's consistency parameterization, which DMD's generator does not have); at t = 0 its step would return its
    input, so such a step is refused."""
    from diffusers import LCMScheduler

    if 0 in timesteps:
        raise ConfigError(f"timesteps={list(timesteps)}: a diffusers LCMScheduler step at t=0 returns its input, "
                          "not the UNet's x_0; train the generator with timesteps >= 1")
    config = {k: v for k, v in dict(schedule_config).items() if not k.startswith("_")}
    return LCMScheduler.from_config({**config, "original_inference_steps": config.get("num_train_timesteps", 1000),
                                     "timestep_scaling": 1e4, "clip_sample": False, "thresholding": False,
                                     "steps_offset": 0})


def export_module(module: nn.Module, out_dir: str | Path, ema: bool = True, teacher_path: str | None = None,
                  dtype: str = "float32") -> Path:
    """The EMA generator of a DMDModule (or the raw one, ema=False) as a diffusers folder: a StableDiffusionPipeline
    for a text-conditional latent UNet (VAE and text encoder from `teacher_path` or the teacher's folder), else a
    pixel pipeline of the UNet alone."""
    generator = module.generator_ema if ema else module.generator
    generator_unet(generator)
    if is_text_conditional(generator):
        from dmd_lightning.sd.export import export_pipeline

        path = teacher_path or getattr(module.teacher, "path", None)
        if path is None:
            raise ConfigError("the teacher has no `path`; pass teacher_path (a pipeline folder with vae/, "
                              "text_encoder/, tokenizer/, scheduler/)")
        return export_pipeline(generator, path, out_dir, dtype)
    from dmd_lightning.export.pixel import export_pixel_pipeline

    return export_pixel_pipeline(generator, out_dir, dtype)
