"""Teacher check: is a diffusion teacher good enough to distil? A report, run before any DMD fit.

python -m dmd_lightning.fmnist.teacher_check --teacher weights/fmnist-teacher --out runs/teacher_check/fmnist-teacher.json

DMD's distribution matching gradient is the difference of two denoisers (Yin et al. 2024, Eq. 7-8); a teacher whose
x_0 estimates are worse than a trivial denoiser's, or leave the data range, hands that error to the generator. So:

1. x_0 MSE of D(x_t, t, label) (conditional, no guidance) on the first `num_images` Fashion-MNIST test images,
   x_t = alpha_t x_0 + sigma_t eps with seeded eps, beside that of the per-pixel linear (Wiener) denoiser fitted on
   the train set: the best affine map of each pixel on its own, so a bar that any network must clear.
2. The share of x_0-estimate pixels outside [-1.05, 1.05], per t and overall (same images and noise): the posterior
   mean of data in [-1, 1] lies in [-1, 1], so an exact denoiser never leaves it.
3. `num_samples` samples of the teacher's deterministic sampler (guidance 1, labels i % 10, seeded noise): pixels
   outside [-1.05, 1.05], min and max, label agreement of the project's classifier (its accuracy on the real test
   set beside it, as the ceiling), FID and KID against the test set with the classifier's features (fid.py).

Goals, in "passes": teacher MSE <= linear MSE at every t; < 0.1% of x_0 pixels out of range; < 0.1% of sample pixels
out of range; label agreement >= 90%. The exit code is 0 either way: this is a report, not a gate.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor

from dmd_lightning.denoisers import Denoiser, PretrainedUNetDenoiser, UNetDenoiser
from dmd_lightning.fmnist.classifier import accuracy, load_classifier
from dmd_lightning.fmnist.data import DEFAULT_ROOT, load_fashion_mnist, to_model_space
from dmd_lightning.fmnist.fid import FIDEvaluator
from dmd_lightning.samplers import SCHEDULERS, make_scheduler, sample_ode

TIMESTEPS = (100, 300, 500, 700, 800, 900, 980)  # and T - 1, the pure-noise end the generator starts from
RANGE = 1.05  # |pixel| above this is out of the data range [-1, 1], with room for rounding
GOALS = {"max_mse_ratio": 1.0, "max_x0_out_of_range": 1e-3, "max_samples_out_of_range": 1e-3,
         "min_label_agreement": 0.9}


class LinearDenoiser:
    """Per-pixel Wiener filter: the MMSE estimate of x_0 among maps a + b x_t applied pixel by pixel.

    With x_0 of mean mu and variance v per pixel and x_t = alpha x_0 + sigma eps, the linear MMSE estimate is
    E[x_0] + Cov(x_0, x_t) / Var(x_t) (x_t - E[x_t]) = mu + alpha v / (alpha^2 v + sigma^2) (x_t - alpha mu),
    the exact posterior mean when x_0 is Gaussian. Constant pixels (v = 0, the padding) are mu.
    """

    def __init__(self, mu: Tensor, v: Tensor):
        self.mu, self.v = mu, v  # (C, H, W) each

    @classmethod
    def fit(cls, images: Tensor) -> "LinearDenoiser":
        """Moments of images (N, C, H, W), population variance (the estimator is for this distribution)."""
        v, mu = torch.var_mean(images.float(), dim=0, correction=0)
        return cls(mu, v)

    def __call__(self, x_t: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """x_t (B, C, H, W); alpha, sigma floats or (B,) tensors. alpha = 0 (zero terminal SNR) gives mu."""
        alpha, sigma = (torch.as_tensor(s).to(x_t).reshape(-1, *[1] * (x_t.ndim - 1)) for s in (alpha, sigma))
        mu, v = self.mu.to(x_t), self.v.to(x_t)
        denom = alpha**2 * v + sigma**2  # Var(x_t); 0 only for a constant pixel without noise
        gain = torch.where(denom > 0, alpha * v / denom.clamp_min(1e-30), 0.0)
        return mu + gain * (x_t - alpha * mu)


def out_of_range(x: Tensor) -> Tensor:
    """Count of pixels outside [-RANGE, RANGE]; NaN and inf count as outside."""
    return (~(x.abs() <= RANGE)).sum()


def autocast(device: torch.device, precision: str):
    """bf16 autocast for the teacher's forward passes; its x_0 estimates are computed in float32 (denoisers.py)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


@torch.no_grad()
def x0_errors(teacher: Denoiser, linear: LinearDenoiser, images: Tensor, labels: Tensor, timesteps: list[int],
              batch_size: int = 500, seed: int = 0, precision: str = "32") -> dict:
    """MSE of the teacher's and the linear denoiser's x_0 estimates at each t, the same eps for both.
    images: (N, C, H, W) in [-1, 1]; eps is drawn on the CPU so that every device sees the same noise."""
    device = next(teacher.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    rows, total_out = [], 0
    for t in timesteps:
        t_one = torch.tensor([t], device=device)
        alpha, sigma = (float(s) for s in teacher.schedule.alpha_sigma(t_one))
        se_teacher = se_linear = out = 0.0
        for i in range(0, len(images), batch_size):
            x0, y = images[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
            eps = torch.randn(x0.shape, generator=gen).to(device)
            x_t = alpha * x0 + sigma * eps
            with autocast(device, precision):
                d = teacher(x_t, t_one.expand(len(x0)), y).float()
            se_teacher += float(((d - x0) ** 2).sum())
            se_linear += float(((linear(x_t, alpha, sigma) - x0) ** 2).sum())
            out += int(out_of_range(d))
        n = images.numel()
        mse_teacher, mse_linear = se_teacher / n, se_linear / n
        rows.append({"t": t, "alpha": alpha, "sigma": sigma, "teacher_mse": mse_teacher, "linear_mse": mse_linear,
                     "ratio": mse_teacher / mse_linear if mse_linear > 0 else math.inf, "out_of_range": out / n})
        total_out += out
    return {"num_images": len(images), "rows": rows, "out_of_range": total_out / (images.numel() * len(timesteps))}


@torch.no_grad()
def draw_samples(teacher: UNetDenoiser, num_samples: int, sampler: str = "ddim", steps: int = 50, batch_size: int = 500,
                 seed: int = 0, precision: str = "32") -> tuple[Tensor, Tensor]:
    """(num_samples, C, H, W) float samples on the CPU and their labels i % 10; noise drawn on the CPU."""
    device = next(teacher.parameters()).device
    unet = teacher.unet.config
    shape = (unet.in_channels, unet.sample_size, unet.sample_size)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_samples) % 10
    out = []
    for i in range(0, num_samples, batch_size):
        y = labels[i:i + batch_size]
        z = torch.randn((len(y), *shape), generator=gen).to(device)
        with autocast(device, precision):
            x = sample_ode(teacher, z, make_scheduler(sampler, teacher.schedule.config), steps, y.to(device))
        out.append(x.float().cpu())
    return torch.cat(out), labels


@torch.no_grad()
def sample_stats(samples: Tensor, labels: Tensor, classifier: torch.nn.Module) -> dict:
    """Range of the samples and the classifier's agreement with the labels they were drawn with (on [-1, 1])."""
    return {"num_samples": len(samples), "out_of_range": int(out_of_range(samples)) / samples.numel(),
            "min": float(samples.min()), "max": float(samples.max()),
            "label_agreement": accuracy(classifier, samples.clamp(-1, 1), labels)}


def check(teacher: str, classifier: str = "weights/fmnist-classifier.safetensors", num_images: int = 1000,
          num_samples: int = 10000, sampler: str = "ddim", steps: int = 50, batch_size: int = 500,
          device: str = "auto", precision: str | None = None, seed: int = 0, data_root: str = DEFAULT_ROOT,
          cache_dir: str = "runs/fid_cache", max_reference: int | None = None) -> dict:
    """Every measurement of the module docstring, as one JSON-ready dict. The FID reference and the classifier's
    reference accuracy use the first `max_reference` test images (None: all 10,000, as the project's FID)."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    precision = precision or ("bf16" if dev.type == "cuda" else "32")
    start = time.time()
    net = PretrainedUNetDenoiser(teacher).to(dev).eval()
    clf = load_classifier(classifier).to(dev)
    train, _ = load_fashion_mnist(data_root, "train")
    test, test_labels = load_fashion_mnist(data_root, "test")
    linear = LinearDenoiser.fit(to_model_space(train))
    timesteps = sorted({t for t in TIMESTEPS if t < net.schedule.T} | {net.schedule.T - 1})
    tick = time.time()
    x0 = x0_errors(net, linear, to_model_space(test[:num_images]), test_labels[:num_images], timesteps,
                   batch_size, seed, precision)
    x0["seconds"], tick = time.time() - tick, time.time()
    samples, labels = draw_samples(net, num_samples, sampler, steps, batch_size, seed, precision)
    stats = {**sample_stats(samples, labels, clf), "sampling_seconds": time.time() - tick}
    evaluator = FIDEvaluator(classifier, data_root=data_root, cache_dir=cache_dir, max_reference=max_reference)
    evaluator.update(samples)
    stats.update(sampler=sampler, steps=steps, **evaluator.compute())
    reference = {"num_images": len(test[:max_reference]),
                 "classifier_accuracy": accuracy(clf, to_model_space(test[:max_reference]),
                                                 test_labels[:max_reference])}
    passes = {"mse_below_linear": all(r["ratio"] <= GOALS["max_mse_ratio"] for r in x0["rows"]),
              "x0_in_range": x0["out_of_range"] < GOALS["max_x0_out_of_range"],
              "samples_in_range": stats["out_of_range"] < GOALS["max_samples_out_of_range"],
              "label_agreement": stats["label_agreement"] >= GOALS["min_label_agreement"]}
    passes["all"] = all(passes.values())
    return {"teacher": str(teacher), "classifier": str(classifier), "device": str(dev), "precision": precision,
            "seed": seed, "x0": x0, "samples": stats, "reference": reference, "goals": GOALS, "passes": passes,
            "seconds": time.time() - start}


def finite(obj):
    """NaN and inf -> None, so that the JSON is strict (a teacher may divide by alpha = 0 at t = T - 1)."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def report(result: dict) -> str:
    """The printed table and summary line."""
    lines = [f"{'t':>5} {'alpha':>7} {'sigma':>7} {'teacher_mse':>12} {'linear_mse':>11} {'ratio':>7} {'x0_out':>9}"]
    lines += [f"{r['t']:>5} {r['alpha']:>7.4f} {r['sigma']:>7.4f} {r['teacher_mse']:>12.5f} {r['linear_mse']:>11.5f} "
              f"{r['ratio']:>7.3f} {r['out_of_range']:>9.2e}" for r in result["x0"]["rows"]]
    s, ref = result["samples"], result["reference"]
    lines.append(f"x0 estimates out of [-{RANGE}, {RANGE}]: {result['x0']['out_of_range']:.2e} of pixels "
                 f"({result['x0']['num_images']} test images)")
    lines.append(f"{s['num_samples']} samples ({s['sampler']}, {s['steps']} steps): out of range "
                 f"{s['out_of_range']:.2e}, min {s['min']:.3f}, max {s['max']:.3f}, label agreement "
                 f"{s['label_agreement']:.4f} (real test set: {ref['classifier_accuracy']:.4f}), "
                 f"FID {s.get('fid', math.nan):.2f}, KID {s.get('kid', math.nan):.4f}")
    failed = [k for k, ok in result["passes"].items() if k != "all" and not ok]
    lines.append(f"teacher check: {'PASS' if not failed else 'FAIL (' + ', '.join(failed) + ')'} "
                 f"in {result['seconds']:.0f} s on {result['device']} ({result['precision']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Measure a diffusion teacher folder against the goals of the module docstring; print a table, write JSON."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--teacher", required=True, help="diffusers folder (unet/ + scheduler/)")
    p.add_argument("--classifier", default="weights/fmnist-classifier.safetensors")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--num-samples", type=int, default=10000)
    p.add_argument("--sampler", default="ddim", choices=sorted(SCHEDULERS))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("32", "bf16"), default=None, help="default: bf16 on CUDA, 32 otherwise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=DEFAULT_ROOT)
    p.add_argument("--cache-dir", default="runs/fid_cache", help="FID reference statistics")
    p.add_argument("--max-reference", type=int, default=None, help="test images for FID (default: all)")
    p.add_argument("--out", default=None, help="default: runs/teacher_check/<teacher folder name>.json")
    a = p.parse_args(argv)
    result = check(a.teacher, a.classifier, a.num_images, a.num_samples, a.sampler, a.steps, a.batch_size, a.device,
                   a.precision, a.seed, a.data_root, a.cache_dir, a.max_reference)
    out = Path(a.out or f"runs/teacher_check/{Path(a.teacher).name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(finite(result), indent=2))
    print(report(result) + f"\nwrote {out}", flush=True)
    return result


if __name__ == "__main__":
    main()
