"""`make toy`: the three variants of DMD Fig. 3 from configs/toy2d.yaml, a PNG of their samples and a table.

python -m dmd_lightning.toy2d.report [--config configs/toy2d.yaml] [--out runs/toy2d] [--max-steps N]
    [--variants NAME ...]  (a subset of the three, by the names of VARIANTS)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dmd_lightning.cli import cli
from dmd_lightning.toy2d.mixture import get_mixture, mode_statistics, sample_mixture

VARIANTS = {
    "real score only": ["--model.dm_loss.use_fake_score", "false", "--model.regression_loss", "null"],
    "real + fake": ["--model.regression_loss", "null"],
    "real + fake + regression": [],
}


def run_variant(config: str, out: Path, name: str, overrides: list[str], max_steps: int | None) -> torch.Tensor:
    """Fit one variant and return its EMA generator's samples on the validation noise."""
    slug = name.replace(" ", "").replace("+", "_")
    args = ["--config", config, *overrides, "--trainer.default_root_dir", str(out / slug),
            "--trainer.logger.init_args.save_dir", str(out), "--trainer.logger.init_args.name", slug,
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    if max_steps is not None:
        args += ["--trainer.max_steps", str(max_steps)]
    run = cli(args, run=False)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    batches = run.datamodule.val_dataloader()
    return torch.cat([run.model.sample(b["z"]) for b in batches])


def plot(samples: dict[str, torch.Tensor], real: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {"real distribution": real, **samples}
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for ax, (title, x) in zip(axes, panels.items()):
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.3)
        ax.set(title=title, xlim=(-3, 3), ylim=(-3, 3), aspect="equal", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/toy2d.yaml")
    p.add_argument("--out", default="runs/toy2d")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--mixture", default="ring8")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    means, weights, std = get_mixture(a.mixture)
    samples = {name: run_variant(a.config, out, name, VARIANTS[name], a.max_steps) for name in a.variants}
    real = sample_mixture(a.mixture, len(next(iter(samples.values()))), torch.Generator().manual_seed(0))
    table = {"real samples": mode_statistics(real, means, weights, std)}
    table |= {name: mode_statistics(x, means, weights, std) for name, x in samples.items()}
    plot(samples, real, out / "toy2d.png")
    print(f"\n{'variant':<26} {'TV (mode mass)':>15} {'modes covered':>14} {'std ratio':>10} {'off-mode':>9}")
    for name, m in table.items():
        print(f"{name:<26} {m['tv']:>15.3f} {m['coverage']:>14.2f} {m['std_ratio']:>10.2f} {m['off_mode']:>9.3f}")
    print(f"\nwrote {out / 'toy2d.png'}")
    return table


if __name__ == "__main__":
    main()
