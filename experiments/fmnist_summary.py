"""The teacher's FID from its pairs, and the grid and table of the variants of experiments/fmnist_results.sh.

python experiments/fmnist_summary.py teacher PAIRS_DIR OUT_JSON        FID/KID of the pairs' teacher images
python experiments/fmnist_summary.py grid PAIRS_DIR OUT_PNG RUN_DIR...  rows: teacher (the pairs' sampler; PAIRS_DIR none:
                                                                   DDIM 50 steps), then each run's EMA generator;
                                                                   same seeds and labels
python experiments/fmnist_summary.py table WORK                        markdown: the runs of experiments/fmnist_results.sh
                                                                   or fmnist_dmd2_results.sh (WORK/runs/*/result.json,
                                                                   the FID curve from their TensorBoard events) beside
                                                                   the teacher (WORK/teacher_pairs.json, if any)
python experiments/fmnist_summary.py steps RUN_DIR...                  FID after each step of a K-step run's EMA
                                                                   generator (RUN_DIR/student; `teacher`: the untrained
                                                                   one), 1,000 samples of the validation seeds, from
                                                                   its own earlier steps and from noised real images
python experiments/fmnist_summary.py dmstep CONFIG CKPT...           FID after each step of a K-step run's raw generator
                                                                   with its x_0 moved along the DM gradient (eta 0,
                                                                   0.05, 0.2): does the gradient point to better samples
python experiments/fmnist_summary.py dmbands CONFIG CKPT...          the same with the DM loss's t in one quarter of
                                                                   [0.02T, 0.98T] at a time (eta 0.01, 0.05, 0.2)
python experiments/fmnist_summary.py curves OUT_PNG RUN...             EMA FID on the validation seeds against iterations,
                                                                   one line per run, one and four steps apart (needs
                                                                   matplotlib); RUN: a run folder or its result JSON
                                                                   (docs/data/fmnist_dmd2_cpu/*.json); a run of no
                                                                   iteration (max_steps 0) gives iteration 0 of the
                                                                   runs of its config; a run resumed from another's
                                                                   checkpoint (RESUME) extends that run's line
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml

from dmd_lightning import PretrainedUNetDenoiser
from dmd_lightning.data.format import PairDataset
from dmd_lightning.data.stream import DMDDataModule
from dmd_lightning.fmnist.data import FashionMNISTImages
from dmd_lightning.fmnist.fid import FIDEvaluator
from dmd_lightning.images import to_uint8
from dmd_lightning.samplers import make_scheduler, sample_ode

TEACHER = {"teacher": "weights/fmnist-teacher", "sampler": "ddim", "num_steps": 50}


def config_evaluator() -> FIDEvaluator:
    """configs/fmnist.yaml's evaluator, so that the reference statistics are cached once for every run."""
    config = yaml.safe_load(Path("configs/fmnist.yaml").read_text())
    return FIDEvaluator(**config["model"]["init_args"]["evaluator"]["init_args"])


def teacher(pairs_dir: str, out_json: str) -> dict:
    pairs = PairDataset(pairs_dir)
    evaluator = config_evaluator()
    evaluator.reset()
    evaluator.update(pairs.x[:len(pairs)].float())
    m = pairs.manifest
    result = {"samples": len(pairs), "sampler": m["sampler"], "num_steps": m["num_steps"], **evaluator.compute()}
    Path(out_json).write_text(json.dumps(result, indent=2))
    print("TEACHER", json.dumps(result), flush=True)
    return result


@torch.no_grad()
def grid(pairs_dir: str, out_png: str, *run_dirs: str) -> None:
    from torchvision.utils import save_image

    if pairs_dir == "none":  # DMD2 runs: the shipped teacher with DDIM 50 steps
        m, dm = TEACHER, DMDDataModule(None, val_seed=1, real_images=FashionMNISTImages())
    else:
        m, dm = PairDataset(pairs_dir).manifest, DMDDataModule(pairs_dir)
    # the validation seeds and labels of the runs (val_seed 1)
    dm.setup("validate")
    b = dm.val_batches()[0]
    rows = [torch.load(Path(run) / "samples.pt", weights_only=True) for run in run_dirs]
    n = len(rows[0])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = PretrainedUNetDenoiser(m["teacher"]).to(device).eval()
    z, cond = b["z"][:n].to(device), b["cond"][:n].to(device)
    x = sample_ode(net, z, make_scheduler(m["sampler"], net.schedule.config), m["num_steps"], cond)
    images = torch.cat([to_uint8(x).cpu(), *rows]).float().div(255)
    save_image(images, out_png, nrow=n, padding=2, pad_value=1.0)


def fid_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(iteration, EMA val/fid) of every validation during training, from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curve = {}
    for f in sorted(run_dir.glob("version_*/events.out.tfevents*")):
        ea = EventAccumulator(str(f))
        ea.Reload()
        tags = ea.Tags()["scalars"]
        if "val/fid" in tags and "train/iteration" in tags:
            its = ea.Scalars("train/iteration")
            for e in ea.Scalars("val/fid"):  # val/fid is logged at a global step; the iteration logged nearest it
                # the first of two that share an iteration: the periodic one, not the one when the fit ends
                curve.setdefault(int(min(its, key=lambda i: abs(i.step - e.step)).value), round(e.value, 2))
    return sorted(curve.items())


def table(work: str) -> str:
    work = Path(work)
    pairs = work / "teacher_pairs.json"
    t = json.loads(pairs.read_text()) if pairs.is_file() else None
    lines = ["| model | iterations | FID (report seeds) | KID | FID (validation seeds) | / teacher | EMA FID on the way |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    if t:
        lines.append(f"| teacher, {t['sampler']} {t['num_steps']} steps (its pairs) | | {t['fid']:.2f} | {t['kid']:.4f} "
                     "| | 1.00 | |")
    for run in sorted((work / "runs").iterdir()):
        if not (run / "result.json").is_file():
            continue
        r = json.loads((run / "result.json").read_text())
        curve = ", ".join(f"{v:g} ({i})" for i, v in fid_curve(run))
        ratio = f"{r['test/fid'] / t['fid']:.2f}" if t else ""
        lines.append(f"| {run.name} | {r['iterations']} | {r['test/fid']:.2f} | {r['test/kid']:.4f} | {r['val/fid']:.2f} "
                     f"| {ratio} | {curve} |")
    text = "\n".join(lines)
    print(text)
    return text


def validation_batches(real: FashionMNISTImages) -> list[dict]:
    """The noise and labels of 1,000 samples of the validation seeds (val_seed 1), in batches of 250."""
    dm = DMDDataModule(None, val_seed=1, val_size=1000, val_batch_size=250, real_images=real)
    dm.setup("validate")
    return dm.val_batches()


@torch.no_grad()
def steps(*run_dirs: str) -> dict[str, dict[str, list[float]]]:
    """FID after each step k of a K-step generator: its x_0 at step k from the input its earlier steps made
    ("simulated"), and from real images (the first 1,000 of the train split, their labels) noised to step k's
    timestep ("real"). The two part a step that maps badly from one whose input is off."""
    from diffusers import UNet2DModel

    from dmd_lightning.generator import MultiStepGenerator

    evaluator, out = config_evaluator(), {}
    real = FashionMNISTImages()
    batches = validation_batches(real)
    for run in run_dirs:
        denoiser = PretrainedUNetDenoiser(TEACHER["teacher"])
        if run != "teacher":
            denoiser.unet = UNet2DModel.from_pretrained(Path(run) / "student").float()
            timesteps = json.loads((Path(run) / "result.json").read_text())["steps"]
        else:
            timesteps = [999, 749, 499, 249]
        g = MultiStepGenerator(denoiser.eval(), timesteps).eval()
        out[run] = {"simulated": [], "real": []}
        for k, t in enumerate(timesteps):
            for kind in ("simulated", "real"):
                evaluator.reset()
                for i, b in enumerate(batches):  # the fresh noise between steps as in validation: seeded by batch
                    if kind == "simulated":
                        x, cond = g.simulate(b["z"], k, b["cond"], torch.Generator().manual_seed(i)), b["cond"]
                    else:  # the batch's real images: the same offsets as its noise
                        rows = slice(i * len(b["z"]), (i + 1) * len(b["z"]))
                        cond = real.labels[rows]
                        x = denoiser.schedule.add_noise(real.images[rows], b["z"], torch.full((len(b["z"]),), t))
                    evaluator.update(g.step(x, k, cond), b)
                out[run][kind].append(round(evaluator.compute()["fid"], 2))
        print("STEPS", run, json.dumps(out[run]), flush=True)
    return out


def dmstep(config: str, *checkpoints: str, bands=((0.02, 0.98),), etas=(0.0, 0.05, 0.2)) -> dict[str, list]:
    """Does the DM gradient point to better samples at each step? For each step k of a K-step run's raw generator
    (a training checkpoint: generator and fake score, or with fake_score_per_step step k's copy), FID of its x_0
    moved by -eta times the DM gradient (Eq. 7-8, the mean of 4 draws of t and noise, t drawn in each band of
    `bands`, fractions of T); 1,000 samples of the validation seeds. Returns per checkpoint, per step, per band, the
    FID at each eta."""
    from dmd_lightning.cli import cli
    from dmd_lightning.losses import distribution_matching_loss

    evaluator, draws, out = config_evaluator(), 4, {}
    batches = validation_batches(FashionMNISTImages())
    for ckpt in checkpoints:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        per_step = any(key.startswith("fake_score.0.") for key in state)  # fake_score_per_step's copies
        m = cli(["--config", config, "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
                 "--trainer.logger", "false", "--model.init_args.evaluator", "null",
                 "--model.init_args.fake_score_per_step", str(per_step).lower()], run=False).model
        missing, unexpected = m.load_state_dict(state, strict=False)  # checkpoints hold no frozen teacher
        assert not unexpected and all(key.startswith("teacher.") for key in missing), (missing, unexpected)
        g = m.generator.eval()
        torch.manual_seed(0)
        out[ckpt] = []
        for k in range(len(g.timesteps)):
            moved = {(band, eta): [] for band in bands for eta in etas}
            for i, b in enumerate(batches):
                with torch.no_grad():
                    x = g.step(g.simulate(b["z"], k, b["cond"], torch.Generator().manual_seed(i)), k, b["cond"])
                for band in bands:
                    grad = 0
                    for _ in range(draws):  # the loss's gradient w.r.t. x is grad / numel
                        xg = x.clone().requires_grad_(True)
                        loss = distribution_matching_loss(xg, m.teacher, m.fake_score_of(k), b["cond"],
                                                          t_range=band)[0]
                        loss.backward()
                        grad = grad + xg.grad * xg.numel() / draws
                    for eta in etas:
                        moved[band, eta].append((x - eta * grad).clamp(-1, 1))
            fids = {}
            for band, eta in moved:
                evaluator.reset()
                for x in moved[band, eta]:
                    evaluator.update(x)
                fids.setdefault(band, []).append(round(evaluator.compute()["fid"], 2))
            out[ckpt].append([fids[band] for band in bands])
            print("DMSTEP", ckpt, k, json.dumps({str(band): dict(zip(etas, fids[band])) for band in bands}), flush=True)
    return out


def dmbands(config: str, *checkpoints: str) -> dict[str, list]:
    """dmstep with t drawn in one quarter of [0.02T, 0.98T] at a time: which noise levels' DM gradient helps or hurts
    each step's samples (eta 0.01, 0.05, 0.2; eta 0 is dmstep's)."""
    edges = (0.02, 0.25, 0.5, 0.75, 0.98)
    return dmstep(config, *checkpoints, bands=tuple(zip(edges[:-1], edges[1:])), etas=(0.01, 0.05, 0.2))


def variant_seed(name: str) -> tuple[str, int]:
    """("gan_4step", 1) from the run name "gan_4step_s1"; (name, 0) for a name without a seed."""
    head, sep, seed = name.rpartition("_s")
    return (head, int(seed)) if sep and seed.isdigit() else (name, 0)


def run_result(source: Path) -> tuple[str, dict]:
    """(run name, result) of a run folder (its result.json; the curve read from its TensorBoard events when the
    result lacks one) or of a result JSON such as docs/data/fmnist_dmd2_cpu/NAME.json."""
    if source.is_dir():
        result = json.loads((source / "result.json").read_text())
        result.setdefault("curve", fid_curve(source))
        return source.name, result
    return source.stem, json.loads(source.read_text())


def curve_points(result: dict) -> list[tuple[int, float]]:
    """The validations during training (every 300 iterations), then the final one at the end of the budget."""
    during = [(int(i), v) for i, v in result.get("curve", []) if int(i) % 300 == 0 and int(i) < result["iterations"]]
    return during + [(result["iterations"], result["val/fid"])]


def curves(out_png: str, *sources: str) -> None:
    """Two panels, one step and four steps: one colour per variant, a line style per seed; a run resumed from
    another's checkpoint continues that run's line; runs of no iteration give each line of as many steps its start
    (the untrained generator is the teacher's network whatever the method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = dict(run_result(Path(s)) for s in sources)
    start = {len(r.get("steps", [999])): r["val/fid"] for r in runs.values() if r["iterations"] == 0}
    continued = {Path(r["resumed_from"]).parents[2].name: name for name, r in runs.items() if r.get("resumed_from")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, steps in zip(axes, (1, 4)):
        names = [n for n, r in runs.items() if r["iterations"] and not r.get("resumed_from")
                 and len(r.get("steps", [999])) == steps]
        variants = sorted({variant_seed(n)[0] for n in names})
        for name in sorted(names):
            r = runs[name]
            points = ([(0, start[steps])] if steps in start else []) + curve_points(r)
            if name in continued:
                points += curve_points(runs[continued[name]])
            variant, seed = variant_seed(name)
            label = name + (" (to 120 min)" if name in continued else "")
            ax.plot(*zip(*points), marker="o", markersize=3, linestyle=["-", "--", ":"][seed % 3],
                    color=f"C{variants.index(variant) % 10}", label=label)
        ax.set(title=f"{steps} step{'s' * (steps > 1)}", xlabel="iteration", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[0].set_ylabel("FID (EMA generator, validation seeds)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


if __name__ == "__main__":
    {"teacher": teacher, "grid": grid, "table": table, "curves": curves, "steps": steps,
     "dmstep": dmstep, "dmbands": dmbands}[sys.argv[1]](*sys.argv[2:])
