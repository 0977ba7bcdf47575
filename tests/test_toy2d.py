import math

import pytest
import torch

from dmd_lightning import VPSchedule
from dmd_lightning.toy2d.mixture import GaussianMixtureDenoiser, get_mixture, mode_statistics, sample_mixture
from dmd_lightning.toy2d.report import main as toy_report


def log_density(x_t, alpha, sigma, means, weights, std):
    var = alpha**2 * std**2 + sigma**2
    d2 = (x_t[:, None] - alpha * means[None]).pow(2).sum(-1)
    return torch.logsumexp(weights.log() - 0.5 * d2 / var - math.log(2 * math.pi * var), dim=1)


@pytest.mark.parametrize("t_val", [0, 200, 700, 999])
def test_mixture_denoiser_is_tweedie_of_the_exact_density(t_val):
    schedule = VPSchedule()
    means, weights, std = get_mixture("ring8")
    d = GaussianMixtureDenoiser(schedule)
    t = torch.full((64,), t_val)
    alpha, sigma = (float(v[0]) for v in schedule.alpha_sigma(t[:1]))
    x_t = alpha * sample_mixture("ring8", 64) + sigma * torch.randn(64, 2)
    x64 = x_t.double().requires_grad_(True)  # near t = T the division by alpha (0.006) magnifies float32's rounding
    (score,) = torch.autograd.grad(log_density(x64, alpha, sigma, means.double(), weights.double(), std).sum(), x64)
    tweedie = (x64.detach() + sigma**2 * score) / alpha  # E[x0 | x_t] from the exact score
    torch.testing.assert_close(d(x_t, t), tweedie.float(), rtol=1e-4, atol=1e-4)


def test_mode_statistics_of_true_and_collapsed_samples():
    means, weights, std = get_mixture("ring8")
    good = mode_statistics(sample_mixture("ring8", 20_000), means, weights, std)
    assert good["tv"] < 0.03 and good["coverage"] == 1.0
    collapsed = mode_statistics(means[:1].expand(1000, 2), means, weights, std)
    assert collapsed["coverage"] == 1 / 8 and collapsed["std_ratio"] == 0.0


def test_fig3_ablation_full_dmd_covers_every_mode(tmp_path):
    """Paper Fig. 3 as numbers: real + fake + regression recovers the modes, real-only does not (the two variants
    asserted on; `make toy` adds real + fake)."""
    table = toy_report(["--out", str(tmp_path), "--variants", "real + fake + regression", "real score only"])
    assert list(table) == ["real samples", "real + fake + regression", "real score only"]
    full, real_only = table["real + fake + regression"], table["real score only"]
    assert full["coverage"] == 1.0 and full["tv"] < 0.1, table
    assert real_only["tv"] > full["tv"] + 0.3 and real_only["std_ratio"] < 0.5, table
    assert (tmp_path / "toy2d.png").stat().st_size > 10_000
