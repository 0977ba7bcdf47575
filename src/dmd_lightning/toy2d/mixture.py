"""The 2-D toy of DMD Fig. 3: a Gaussian mixture whose score is exact at every noise level.

The teacher is the mixture's exact denoiser; generator and fake score are small MLPs. Mode mass against the
true weights (total variation) and the fraction of modes covered measure each variant.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dmd_lightning.data.stream import StreamDataModule
from dmd_lightning.denoisers import Denoiser
from dmd_lightning.errors import ConfigError, check_int
from dmd_lightning.metrics.evaluation import Evaluator, gather_samples
from dmd_lightning.samplers import make_scheduler, sample_ode
from dmd_lightning.schedule import VPSchedule, expand_like


def ring_mixture(num_modes: int, radius: float, std: float, weights: list[float] | None = None):
    """Means on a circle; weights default to a skewed profile so that mode mass is informative."""
    angles = torch.arange(num_modes) * 2 * math.pi / num_modes
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    w = torch.tensor(weights) if weights is not None else torch.linspace(2.0, 1.0, num_modes)
    return means, w / w.sum(), std


MIXTURES = {
    "ring8": dict(num_modes=8, radius=2.0, std=0.15),
}


def get_mixture(name: str) -> tuple[Tensor, Tensor, float]:
    if name not in MIXTURES:
        raise ConfigError(f"unknown mixture {name!r}; expected one of {sorted(MIXTURES)}")
    return ring_mixture(**MIXTURES[name])


def sample_mixture(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    means, weights, std = get_mixture(name)
    k = torch.multinomial(weights, n, replacement=True, generator=generator)
    return means[k] + std * torch.randn(n, 2, generator=generator)


class GaussianMixtureDenoiser(Denoiser):
    """Exact E[x_0 | x_t] for x_0 ~ sum_k w_k N(m_k, s^2 I): responsibilities times per-component posteriors."""

    def __init__(self, schedule: VPSchedule, mixture: str = "ring8"):
        super().__init__()
        self.schedule = schedule
        means, weights, std = get_mixture(mixture)
        self.register_buffer("means", means)
        self.register_buffer("log_weights", weights.log())
        self.std = std

    def forward(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        alpha, sigma = (expand_like(v, x_t)[:, None] for v in self.schedule.alpha_sigma(t))  # (B, 1, 1)
        var = alpha**2 * self.std**2 + sigma**2  # variance of x_t given the component
        diff = x_t[:, None, :] - alpha * self.means[None]  # (B, K, 2)
        logits = self.log_weights - 0.5 * diff.pow(2).sum(-1) / var[..., 0]  # (B, K); equal var drops out
        resp = logits.softmax(dim=1)
        posterior = self.means[None] + (alpha * self.std**2 / var) * diff  # (B, K, 2)
        return (resp[..., None] * posterior).sum(dim=1)


def mlp(d_in: int, d_out: int, hidden: int, depth: int) -> nn.Sequential:
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.SiLU()]
        d = hidden
    return nn.Sequential(*layers, nn.Linear(d, d_out))


class MLPDenoiser(Denoiser):
    """A small MLP on (x_t, sinusoidal t embedding), trained in the schedule's parameterization."""

    def __init__(self, schedule: VPSchedule, hidden: int = 128, depth: int = 3, dim: int = 2, t_features: int = 16):
        super().__init__()
        self.schedule = schedule
        self.t_features = t_features
        self.net = mlp(dim + 2 * t_features, dim, hidden, depth)

    def forward(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        freqs = torch.exp(torch.linspace(0, math.log(1000), self.t_features, device=x_t.device))
        angle = (t.float() / self.schedule.T)[:, None] * freqs
        out = self.net(torch.cat([x_t, angle.sin(), angle.cos()], dim=1))
        return self.schedule.to_x0(out, x_t, t)


class MLPGenerator(nn.Module):
    """G(z): 2-D noise to 2-D samples."""

    def __init__(self, hidden: int = 128, depth: int = 3, dim: int = 2):
        super().__init__()
        self.net = mlp(dim, dim, hidden, depth)

    def forward(self, z: Tensor, cond=None) -> Tensor:
        return self.net(z)


class ModeCoverage(Evaluator):
    """Mass per mode vs the true weights. A sample belongs to its nearest mode if within `radius_stds` stds.

    tv: total variation between sample and true mode mass (off-mode samples count as an extra bin);
    coverage: fraction of modes holding at least `min_fraction` of their true mass;
    std_ratio: mean within-mode std over the true std (mode collapse drives it to 0).
    """

    def __init__(self, mixture: str = "ring8", radius_stds: float = 4.0, min_fraction: float = 0.25):
        super().__init__()
        self.means, self.weights, self.std = get_mixture(mixture)
        self.radius_stds, self.min_fraction = radius_stds, min_fraction
        self.samples: list[Tensor] = []

    def reset(self) -> None:
        self.samples = []

    def update(self, samples: Tensor, batch: dict) -> None:
        self.samples.append(samples.detach().float().cpu())

    def compute(self) -> dict[str, float]:
        samples = gather_samples(torch.cat(self.samples))  # every rank's, under DDP
        return mode_statistics(samples, self.means, self.weights, self.std, self.radius_stds, self.min_fraction)


def mode_statistics(x: Tensor, means: Tensor, weights: Tensor, std: float, radius_stds: float = 4.0,
                    min_fraction: float = 0.25) -> dict[str, float]:
    """The ModeCoverage metrics of samples x (N, 2)."""
    dist = torch.cdist(x, means)  # (N, K)
    d_min, k = dist.min(dim=1)
    on_mode = d_min < radius_stds * std
    mass = torch.bincount(k[on_mode], minlength=len(means)).float() / len(x)
    off = 1 - mass.sum()
    stds = [x[on_mode & (k == j)].std(dim=0).mean() for j in range(len(means)) if (on_mode & (k == j)).sum() > 1]
    return {
        "tv": float(0.5 * ((mass - weights).abs().sum() + off)),
        "coverage": float((mass >= min_fraction * weights).float().mean()),
        "std_ratio": float(torch.stack(stds).mean() / std) if stds else 0.0,
        "off_mode": float(off),
    }


class ToyDataModule(StreamDataModule):
    """Noise for the DM loss, and noise-sample pairs from the mixture's exact probability-flow ODE.

    `batch_size` and `pair_batch_size` are per device; the stream position is checkpointed.
    """

    def __init__(self, mixture: str = "ring8", batch_size: int = 256, pair_batch_size: int = 256,
                 num_pairs: int = 4096, sampler: str = "heun", sampler_steps: int = 100, val_size: int = 8192,
                 val_batch_size: int = 1024, seed: int = 0, schedule: VPSchedule | None = None):
        super().__init__()
        for key in ("batch_size", "pair_batch_size", "num_pairs", "sampler_steps", "val_size", "val_batch_size"):
            check_int(key, locals()[key])
        self.save_hyperparameters(ignore=["schedule"])
        self.schedule = schedule or VPSchedule()
        self.pairs: tuple[Tensor, Tensor] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.pairs is None:
            self.pairs = make_pairs(self.hparams.mixture, self.hparams.num_pairs, self.schedule,
                                    self.hparams.sampler, self.hparams.sampler_steps, self.hparams.seed)

    sample_shape = (2,)

    def train_batch(self, g: torch.Generator, world: int) -> dict[str, Tensor]:
        """A global batch for `world` devices: fresh DM noise and a random draw of regression pairs."""
        pair_z, pair_x = self.pairs
        idx = torch.randint(0, len(pair_z), (self.hparams.pair_batch_size * world,), generator=g)
        return {"z": torch.randn(self.hparams.batch_size * world, 2, generator=g), "pair_z": pair_z[idx],
                "pair_x": pair_x[idx]}

    def train_dataloader(self) -> DataLoader:
        return self.stream_loader(self.train_batch, self.hparams.seed + 1)

    def val_dataloader(self) -> DataLoader:
        z = torch.randn(self.hparams.val_size, 2, generator=torch.Generator().manual_seed(self.hparams.seed + 2))
        return DataLoader([{"z": c} for c in z.split(self.hparams.val_batch_size)], batch_size=None)

    test_dataloader = val_dataloader


def make_pairs(mixture: str, n: int, schedule: VPSchedule, sampler: str, steps: int, seed: int):
    """(z, x): noise and the exact teacher's deterministic ODE solution from it."""
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    teacher = GaussianMixtureDenoiser(schedule, mixture)
    scheduler = make_scheduler(sampler, schedule.config)
    return z, sample_ode(teacher, z, scheduler, steps)
