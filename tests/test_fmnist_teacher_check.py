"""The teacher check: its linear (Wiener) baseline, and an end-to-end run on a tiny teacher it saves itself."""

import json

import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler
from safetensors.torch import save_file

from dmd_lightning.fmnist.classifier import FMNISTClassifier
from dmd_lightning.fmnist.teacher_check import TIMESTEPS, LinearDenoiser, finite, main, out_of_range


def test_linear_denoiser_is_the_gaussian_posterior_mean():
    """For x_0 ~ N(mu, v) per pixel the Wiener filter is E[x_0 | x_t]: precision-weighted mean of prior and data."""
    mu, v = torch.tensor([[[0.3, -0.5]]]), torch.tensor([[[0.2, 0.05]]])  # (C, H, W) = (1, 1, 2)
    x0 = mu + v.sqrt() * torch.randn(200_000, 1, 1, 2)
    fitted = LinearDenoiser.fit(x0)
    torch.testing.assert_close(fitted.mu, mu, atol=5e-3, rtol=0)
    torch.testing.assert_close(fitted.v, v, atol=0, rtol=2e-2)
    d = LinearDenoiser(mu, v)
    for alpha, sigma in ((0.9, 0.4), (0.3, 0.95), (0.0, 1.0)):
        x_t = alpha * x0 + sigma * torch.randn_like(x0)
        precision = 1 / v + alpha**2 / sigma**2
        posterior_mean = (mu / v + alpha * x_t / sigma**2) / precision
        torch.testing.assert_close(d(x_t, alpha, sigma), posterior_mean)
        mse = ((d(x_t, alpha, sigma) - x0) ** 2).mean(0)
        torch.testing.assert_close(mse, 1 / precision, atol=0, rtol=2e-2)  # the posterior variance


def test_linear_denoiser_beats_other_per_pixel_maps():
    """On non-Gaussian data: below the mean, clipped inversion x_t / alpha, and its own gain scaled by 0.8 or 1.2."""
    x0 = torch.rand(20_000, 1, 4, 4).pow(3) * 2 - 1  # skewed, in [-1, 1]
    x0[:, :, 0, 0] = -1.0  # a constant pixel, as the padding of Fashion-MNIST
    d = LinearDenoiser.fit(x0)
    alpha, sigma = torch.full((len(x0),), 0.6), torch.full((len(x0),), 0.8)  # (B,) as a schedule gives them
    x_t = 0.6 * x0 + 0.8 * torch.randn_like(x0)
    best = d(x_t, alpha, sigma)
    assert torch.equal(best[:, :, 0, 0], x0[:, :, 0, 0])

    def mse(x):
        return float(((x - x0) ** 2).mean())

    scaled = [d.mu + s * (best - d.mu) for s in (0.8, 1.2)]  # mu + s * gain * (x_t - alpha mu)
    others = [d.mu.expand_as(x0), (x_t / 0.6).clamp(-1, 1), *scaled]
    assert all(mse(best) < mse(o) for o in others), (mse(best), [mse(o) for o in others])


def test_out_of_range_counts_nan():
    assert int(out_of_range(torch.tensor([0.0, 1.05, -1.06, float("nan"), float("inf")]))) == 3


def test_finite_makes_strict_json():
    """An epsilon teacher's x_0 estimate at alpha = 0 (zero terminal SNR) is inf or NaN: the JSON gets null."""
    obj = finite({"rows": [{"ratio": float("inf"), "t": 999}], "mse": float("nan"), "ok": True})
    assert json.loads(json.dumps(obj, allow_nan=False)) == {"rows": [{"ratio": None, "t": 999}], "mse": None, "ok": True}


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A random class-conditional 32x32 teacher as a diffusers folder, and random classifier weights."""
    root = tmp_path_factory.mktemp("teacher_check")
    torch.manual_seed(0)
    unet, schedule = tiny_unet(size=32)
    unet.save_pretrained(root / "teacher" / "unet")
    DDPMScheduler(**schedule.config, clip_sample=False).save_pretrained(root / "teacher" / "scheduler")
    save_file(FMNISTClassifier().state_dict(), str(root / "classifier.safetensors"))
    return root


def test_main_end_to_end(tiny_teacher, capsys):
    out = tiny_teacher / "report.json"
    main(["--teacher", str(tiny_teacher / "teacher"), "--classifier", str(tiny_teacher / "classifier.safetensors"),
          "--num-images", "20", "--num-samples", "20", "--steps", "2", "--batch-size", "8", "--device", "cpu",
          "--cache-dir", str(tiny_teacher / "fid_cache"), "--max-reference", "200", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result) >= {"teacher", "device", "precision", "x0", "samples", "reference", "goals", "passes"}
    rows = result["x0"]["rows"]
    assert [r["t"] for r in rows] == [*TIMESTEPS, 999]
    for r in rows:
        assert set(r) == {"t", "alpha", "sigma", "teacher_mse", "linear_mse", "ratio", "out_of_range"}
        assert 0 <= r["out_of_range"] <= 1 and r["linear_mse"] > 0
    s = result["samples"]
    assert s["num_samples"] == 20 and 0 <= s["out_of_range"] <= 1 and 0 <= s["label_agreement"] <= 1
    assert s["min"] <= s["max"] and s["fid"] >= 0 and {"kid", "sampler", "steps"} <= set(s)
    assert 0 <= result["x0"]["out_of_range"] <= 1 and result["reference"]["num_images"] == 200
    assert 0 <= result["reference"]["classifier_accuracy"] <= 1
    assert set(result["passes"]) == {"mse_below_linear", "x0_in_range", "samples_in_range", "label_agreement", "all"}
    assert result["precision"] == "32"
    assert "teacher check: " in capsys.readouterr().out
