"""The teacher's deterministic ODE samplers, driven by diffusers' own schedulers.

Every sampler speaks to a Denoiser; the scheduler gets the denoiser's x_0 estimate converted to the
parameterization it was configured with, so any diffusers scheduler works with any teacher.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import Tensor

from dmd_lightning.denoisers import Denoiser, guided
from dmd_lightning.errors import ConfigError

SCHEDULERS = {
    "ddim": ("DDIMScheduler", {"clip_sample": False}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "heun": ("HeunDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
}


def make_scheduler(name: str, config: dict, **overrides):
    """A diffusers scheduler of kind `name` (ddim, pndm, dpmsolver++, heun, euler) on the teacher's schedule."""
    import diffusers

    if name not in SCHEDULERS:
        raise ConfigError(f"unknown sampler {name!r}; expected one of {sorted(SCHEDULERS)}")
    cls_name, defaults = SCHEDULERS[name]
    kwargs = {k: v for k, v in {**defaults, **config, **overrides}.items() if v is not None}
    cls = getattr(diffusers, cls_name)
    if kwargs.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in inspect.signature(cls).parameters:
        zero_snr = sorted(k for k, (c, _) in SCHEDULERS.items()
                          if "rescale_betas_zero_snr" in inspect.signature(getattr(diffusers, c)).parameters)
        raise ConfigError(f"sampler {name!r} ({cls_name}) does not take a zero-terminal-SNR schedule; "
                         f"use one of {zero_snr}")
    return cls.from_config(kwargs)


@torch.no_grad()
def sample_ode(
    denoiser: Denoiser,
    x: Tensor,
    scheduler,
    num_steps: int,
    cond=None,
    guidance_scale: float = 1.0,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """Integrate the probability-flow ODE from noise x ~ N(0, I) with `scheduler` in `num_steps` steps.

    callback(i, t, x0_estimate) is called after every denoiser evaluation (counting them gives the NFE).
    """
    scheduler.set_timesteps(num_steps, device=x.device)
    x = x * scheduler.init_noise_sigma
    kind = scheduler.config.prediction_type
    native = kind == denoiser.schedule.prediction_type  # the network's output goes to the scheduler as is
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t)
        t_batch = t.reshape(1).expand(x.shape[0]).to(x.device)
        if native:
            model_output = guided(denoiser, x_in, t_batch, cond, guidance_scale, native=True)
            if callback is not None:
                callback(i, t, denoiser.schedule.to_x0(model_output.float(), x_in.float(), t_batch))
        else:
            x0 = guided(denoiser, x_in, t_batch, cond, guidance_scale)
            if callback is not None:
                callback(i, t, x0)
            model_output = denoiser.schedule.from_x0(x0, x_in.float(), t_batch, kind)
        x = scheduler.step(model_output.to(x.dtype), t, x).prev_sample
    return x
