"""The training curves of a `dmd fit` run as one PNG (docs/img/): the losses of both networks, the gradient norms
and the DM loss's weighting, read from the run's TensorBoard event files.

python experiments/loss_curves.py RUN_DIR OUT.png   (RUN_DIR: a folder holding events.out.tfevents.* files)
Needs matplotlib (not a dependency of the package).
"""

from __future__ import annotations

import sys
from pathlib import Path

PANELS = [  # (title, tags)
    ("generator loss terms", ["generator/loss_dm", "generator/loss_regression", "generator/loss_gan"]),
    ("fake-score loss terms", ["fake_score/loss_denoising", "fake_score/loss_classifier"]),
    ("gradient norms (before clipping)", ["generator/grad_norm", "fake_score/grad_norm"]),
    ("DM loss: mean weight 1 / mean|x - mu_real| and |grad|", ["dm/weight_mean", "dm/grad_norm"]),
]


def read_scalars(run: Path) -> dict[str, tuple[list[int], list[float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, tuple[list[int], list[float]]] = {}
    for folder in sorted({p.parent for p in run.rglob("events.out.tfevents*")}):
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            steps, values = out.setdefault(tag, ([], []))
            for e in events.Scalars(tag):
                steps.append(e.step)
                values.append(e.value)
    return out


def main(run: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalars = read_scalars(Path(run))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.2))
    for ax, (title, tags) in zip(axes, PANELS):
        for tag in tags:
            if tag in scalars:
                ax.plot(*scalars[tag], label=tag.split("/")[-1], lw=1.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training iteration (batch)", fontsize=8)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"written {out} ({', '.join(sorted(t for t in scalars if '/' in t))})")


if __name__ == "__main__":
    main(*sys.argv[1:3])
