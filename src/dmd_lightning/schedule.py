"""The one noise schedule: variance-preserving (DDPM) teachers as diffusers defines them.

x_t = alpha_t * x_0 + sigma_t * eps, alpha_t = sqrt(alphas_cumprod[t]), sigma_t = sqrt(1 - alphas_cumprod[t])
(Ho et al. 2020, Eq. 4). Everything else in the package asks this object for alphas and sigmas.

`rescale_betas_zero_snr` shifts and scales the schedule so that alpha_{T-1} = 0 (Lin et al. 2024, "Common
Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1): the last timestep is pure noise, which is
what a one-step generator reads. x_0 is then not identifiable from epsilon at T-1, so such a schedule takes
v-prediction (or x_0-prediction), and samplers start at T-1 (`timestep_spacing: trailing`, their Sec. 3.3).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from dmd_lightning.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def make_betas(beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Betas of diffusers' DDPMScheduler for its three standard schedules (float64)."""
    T = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if beta_schedule == "scaled_linear":  # Stable Diffusion's schedule
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, Eq. 17, betas capped at 0.999

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ConfigError(f"unknown beta_schedule {beta_schedule!r}; expected linear, scaled_linear or squaredcos_cap_v2")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Betas whose sqrt(alphas_cumprod) is shifted to end at 0 and scaled to keep its start (Lin et al. 2024, Alg. 1)."""
    sqrt_ab = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def expand_like(v: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) so that it broadcasts against x."""
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


class VPSchedule(nn.Module):
    """alphas_cumprod of a DDPM teacher, with the conversions between its parameterizations.

    A module only so that its buffer follows the networks to their device; it has no state_dict entries.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        prediction_type: str = "epsilon",
        rescale_betas_zero_snr: bool = False,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        set_alpha_to_one: bool | None = None,
    ):
        """The diffusers scheduler config's keys; `timestep_spacing`, `steps_offset` and `set_alpha_to_one` (None:
        each sampler's default) are the teacher's sampler settings, passed on to the samplers (samplers.py)."""
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        if rescale_betas_zero_snr and prediction_type == "epsilon":
            raise ConfigError("rescale_betas_zero_snr makes alpha_{T-1} = 0, where epsilon-prediction cannot give x_0; "
                             "use prediction_type v_prediction (Lin et al. 2024) or sample")
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ConfigError(f"unknown timestep_spacing {timestep_spacing!r}; expected one of {TIMESTEP_SPACINGS}")
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        self.prediction_type = prediction_type
        self.zero_terminal_snr = rescale_betas_zero_snr
        betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        # EDM-style noise level s_t = sigma_t / alpha_t, which diffusers interpolates for fractional t; like
        # diffusers' Euler scheduler, a zero terminal alpha_cumprod counts as 2**-24 there (s = 4096, not inf).
        ac = alphas_cumprod.clamp(min=2**-24)
        self.register_buffer("edm_sigmas", ((1 - ac) / ac).sqrt().float(), persistent=False)
        self.config = dict(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            beta_start=beta_start,
            beta_end=beta_end,
            prediction_type=prediction_type,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            **({} if set_alpha_to_one is None else {"set_alpha_to_one": set_alpha_to_one}),
        )

    @classmethod
    def from_config(cls, config: dict) -> "VPSchedule":
        """Build from a diffusers scheduler config (any scheduler class; extra keys are ignored)."""
        keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type",
                "rescale_betas_zero_snr", "timestep_spacing", "steps_offset", "set_alpha_to_one")
        return cls(**{k: config[k] for k in keys if k in config})

    @classmethod
    def from_pretrained(cls, path: str | Path, subfolder: str | None = "scheduler") -> "VPSchedule":
        """Read `scheduler_config.json` from a diffusers folder or hub id."""
        from diffusers import DDPMScheduler

        return cls.from_config(dict(DDPMScheduler.load_config(str(path), subfolder=subfolder)))

    @property
    def T(self) -> int:
        return self.num_train_timesteps

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_t, sigma_t for integer or fractional timesteps t of shape (B,)."""
        t = t.to(self.edm_sigmas.device)
        if t.is_floating_point() and not torch.equal(t, t.round()):
            t = t.clamp(0, self.T - 1)
            lo = t.floor().long().clamp(max=self.T - 2)
            frac = t - lo
            s = self.edm_sigmas[lo] * (1 - frac) + self.edm_sigmas[lo + 1] * frac
            alpha = (1 + s**2).rsqrt()
            return alpha, s * alpha
        ac = self.alphas_cumprod[t.long()]  # exact, not the interpolation's 2**-24 floor (zero terminal SNR)
        return ac.sqrt(), (1 - ac).sqrt()

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Forward process q(x_t | x_0)."""
        alpha, sigma = self.alpha_sigma(t)
        return expand_like(alpha, x0) * x0 + expand_like(sigma, x0) * eps

    def to_x0(self, pred: Tensor, x_t: Tensor, t: Tensor, prediction_type: str | None = None) -> Tensor:
        """A network's output in `prediction_type` -> the x_0 estimate (the denoiser D(x_t, t))."""
        kind = prediction_type or self.prediction_type
        alpha, sigma = (expand_like(v, x_t) for v in self.alpha_sigma(t))
        if kind == "epsilon":
            return (x_t - sigma * pred) / alpha
        if kind == "v_prediction":  # v = alpha * eps - sigma * x0 (Salimans & Ho 2022)
            return alpha * x_t - sigma * pred
        if kind == "sample":
            return pred
        raise ValueError(f"unknown prediction_type {kind!r}")

    def from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor, prediction_type: str | None = None) -> Tensor:
        """The x_0 estimate -> the output a network of `prediction_type` would give."""
        kind = prediction_type or self.prediction_type
        alpha, sigma = (expand_like(v, x_t) for v in self.alpha_sigma(t))
        if kind == "epsilon":
            return (x_t - alpha * x0) / sigma
        if kind == "v_prediction":
            return (alpha * x_t - x0) / sigma
        if kind == "sample":
            return x0
        raise ValueError(f"unknown prediction_type {kind!r}")

    def score(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """grad log p_t(x_t) = -(x_t - alpha_t D(x_t)) / sigma_t^2 (Tweedie)."""
        alpha, sigma = (expand_like(v, x_t) for v in self.alpha_sigma(t))
        return -(x_t - alpha * x0) / sigma**2

    def loss_weight(self, t: Tensor, prediction_type: str | None = None) -> Tensor:
        """lambda(t) with ||pred - target||^2 = lambda(t) ||x0_hat - x0||^2 for the given parameterization."""
        kind = prediction_type or self.prediction_type
        alpha, sigma = self.alpha_sigma(t)
        if kind == "epsilon":
            return alpha**2 / sigma**2  # the SNR
        if kind == "v_prediction":
            return 1 / sigma**2  # SNR + 1
        return torch.ones_like(alpha)

    def t_bounds(self, lo: float, hi: float) -> tuple[int, int]:
        """The integer timesteps [t_min, t_max] that fractions [lo, hi] of the train range cover."""
        return int(lo * self.T), min(int(hi * self.T), self.T - 1)

    def sample_t(self, n: int, lo: float, hi: float, device=None, generator: torch.Generator | None = None) -> Tensor:
        """Integer timesteps uniform in [lo*T, hi*T] (fractions of the train range)."""
        t_min, t_max = self.t_bounds(lo, hi)
        return torch.randint(t_min, t_max + 1, (n,), device=device, generator=generator)
