"""Checks that fail early, in one line, when settings, data, teacher and checkpoints do not fit together."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from dmd_lightning.denoisers import Denoiser
from dmd_lightning.errors import (
    CheckpointError,
    ConfigError,
    ShapeMismatchError,
    check,
    check_choice,
    check_fraction_range,
    check_int,
    check_number,
)
from dmd_lightning.generator import error_gain
from dmd_lightning.perf import CUDA_GRAPH_MODES
from dmd_lightning.schedule import VPSchedule


def check_dmd_arguments(hp) -> None:
    """ConfigError naming the first of DMDModule's arguments (hp: its hyper-parameters, the configured losses and
    optimization as dicts) that cannot work."""
    dm, fake, optim = hp.dm_loss, hp.fake_loss, hp.optim
    check_number("guidance_scale", dm["guidance_scale"], 0.0)
    check_number("dm_loss.weight", dm["weight"], 0.0)
    check_fraction_range("t_range", dm["t_range"])
    check_fraction_range("fake_loss.t_range", fake["t_range"])
    check_number("regression_weight", hp.regression_weight, 0.0)
    check_int("fake_updates_per_generator_update", hp.fake_updates_per_generator_update)
    for key in ("generator_lr", "fake_lr", "gradient_clip"):
        check_number(key, optim[key], 0.0, low_open=True)
    check_number("weight_decay", optim["weight_decay"], 0.0)
    betas = optim["betas"]
    check(isinstance(betas, (list, tuple)) and len(betas) == 2 and all(
        isinstance(b, (int, float)) and 0 <= b < 1 for b in betas), "betas", betas, "must be two numbers in [0, 1)")
    check_int("warmup_steps", optim["warmup_steps"], 0)
    check_choice("lr_decay", optim["lr_decay"], ("constant", "cosine"))
    check_int("decay_steps", optim["decay_steps"], 1, allow_none=True)
    check_number("min_lr_ratio", optim["min_lr_ratio"], 0.0, 1.0)
    check_int("accumulate", optim["accumulate"])
    check_number("ema_decay", hp.ema_decay, 0.0, 1.0)
    check_choice("nonfinite.action", hp.nonfinite["action"], ("skip", "stop"))
    check_int("nonfinite.max_consecutive", hp.nonfinite["max_consecutive"])
    check_choice("nonfinite.check", hp.nonfinite["check"], ("update", "logging"))
    if hp.compile is not None:
        check_choice("compile.mode", hp.compile["mode"],
                     (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
        if hp.compile["mode"] in CUDA_GRAPH_MODES and optim["accumulate"] > 1:
            raise ConfigError(f"compile.mode={hp.compile['mode']!r} replays CUDA graphs, whose gradient outputs the "
                              f"next micro-batch overwrites: it cannot accumulate (optim.accumulate="
                              f"{optim['accumulate']}); use mode default or max-autotune-no-cudagraphs")
    if hp.gan is not None:
        check_number("gan.generator_weight", hp.gan["generator_weight"], 0.0)
        check_number("gan.classifier_weight", hp.gan["classifier_weight"], 0.0)


def check_regression(generator: nn.Module, regression_loss: nn.Module | None, weight: float) -> None:
    """ConfigError for a regression loss on a multi-step generator: its pairs map noise to a sample in one step."""
    if len(getattr(generator, "timesteps", (0,))) > 1 and regression_loss is not None and weight > 0:
        raise ConfigError("the regression loss needs a one-step generator (its pairs map noise to a sample); "
                          "set regression_loss: null for a multi-step generator")


def check_per_step(per_step: bool, steps: int, step_draw: str = "update") -> None:
    """ConfigError for a fake score per step without a multi-step generator, an unknown `step_draw`, or a step per
    sample with a fake score per step (whose update takes one step's outputs)."""
    if step_draw not in ("update", "sample"):
        raise ConfigError(f"step_draw={step_draw!r}: 'update' (one step per update) or 'sample' (a step per sample)")
    if per_step and steps < 2:
        raise ConfigError("fake_score_per_step needs a multi-step generator (MultiStepGenerator with 2 or more "
                          "timesteps); with one step there is one fake score already")
    if per_step and step_draw == "sample":
        raise ConfigError("fake_score_per_step trains copy k on step k's outputs, one step per update: use "
                          "step_draw='update' with it")


def check_same_model(own: dict, state: dict) -> None:
    """CheckpointError, before Lightning's strict load, when a checkpoint's weights are not this model's."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what} (first: {v[0]})" for what, v in (("missing weights", missing),
                 ("unexpected weights", unexpected), ("of other shapes, checkpoint vs model", shapes)) if v]
        raise CheckpointError(f"the checkpoint is not of this model: {'; '.join(parts)}; use the config it was "
                              "trained with")


def check_data(teacher: Denoiser, datamodule, gan: bool = False) -> None:
    """The data module's samples, labels and real images fit the teacher and the losses (the checks below)."""
    if (shape := getattr(datamodule, "sample_shape", None)) is not None:
        check_sample_shape(teacher, tuple(shape))
    check_labels(teacher, getattr(datamodule, "num_classes", None))
    if gan and datamodule is not None and getattr(datamodule, "real", None) is None:
        raise ConfigError("the GAN (gan: ...) needs real images: set the data module's real_images "
                          "(dmd_lightning.fmnist.data.FashionMNISTImages; for SD, dmd_lightning.sd.real.RealLatents)")


def real_images(batch: dict):
    """The batch's real images for the GAN classifier; a ConfigError for data without them (a DataLoader given to
    `fit` directly, which check_data cannot see)."""
    if "real_x" not in batch:
        raise ConfigError("the GAN (gan: ...) needs real images in every training batch (key 'real_x'); use "
                          "DMDDataModule(real_images=...) or add them to your data")
    return batch["real_x"]


def check_labels(teacher: Denoiser, num_classes: int | None) -> None:
    """ConfigError when the data's labels 0..num_classes-1 reach the teacher's null label (classifier-free
    guidance's "no label") or beyond its class embedding."""
    null = getattr(teacher, "null_label", None)
    if num_classes is not None and null is not None and num_classes > null:
        raise ConfigError(f"num_classes={num_classes}: the data's labels reach {num_classes - 1}, but the teacher "
                          f"embeds labels 0..{null - 1} and uses {null} as its null label; set data num_classes "
                          f"<= {null}")


def is_finite_module(net: nn.Module) -> bool:
    return all_finite(net.parameters())


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t.detach()).all()) for t in tensors)


def size_pair(sample_size) -> tuple[int, int]:
    """A diffusers UNet config's sample_size (an int or [H, W]) as (H, W)."""
    return tuple(sample_size) if isinstance(sample_size, (list, tuple)) else (sample_size, sample_size)


def check_sample_shape(teacher: Denoiser, shape: tuple[int, ...]) -> None:
    """ShapeMismatchError naming both shapes when data of `shape` (C, H, W) cannot go through a UNet teacher.

    Channels must match; a pixel-space UNet2DModel needs its sample_size, a text-conditional UNet (latents)
    a size divisible by its total downsampling."""
    unet = getattr(teacher, "unet", None)
    config = getattr(unet, "config", None)
    if config is None or "in_channels" not in config:
        return
    size = size_pair(config.get("sample_size"))
    want = (config["in_channels"], *size)
    text = getattr(teacher, "text_conditional", False)
    factor = 2 ** (len(config.get("block_out_channels", [0])) - 1)
    fits = len(shape) == 3 and shape[0] == want[0] and (
        all(s % factor == 0 for s in shape[1:]) if text else tuple(shape[1:]) == size)
    if not fits:
        need = f"(C, H, W) = {want}" if not text else f"{want[0]} channels and H, W divisible by {factor}"
        raise ShapeMismatchError(f"the data's samples have shape {tuple(shape)} but the teacher "
                                 f"{type(unet).__name__} takes {need}; fix the data (pairs made by this "
                                 "teacher) or the teacher")


def warn_error_gain(schedule: VPSchedule, t_range: tuple[float, float]) -> None:
    """Warns when the DM loss reaches timesteps where the denoisers' x0-predictions amplify their raw-output
    differences more than 50x (an epsilon teacher near the end of a schedule without zero terminal SNR): the
    fake score's fitting noise can then dominate the gradient."""
    _, t_max = schedule.t_bounds(*t_range)
    if (gain := error_gain(schedule, t_max)) > 50:
        warnings.warn(f"the DM loss reaches t = {t_max}, where the denoisers' x0-predictions multiply their "
                      f"{schedule.prediction_type} differences by {gain:.0f}: the fake score's fitting noise can "
                      "dominate the gradient. Consider a lower t_range upper bound (0.5 on the linear DDPM schedule).",
                      stacklevel=3)
