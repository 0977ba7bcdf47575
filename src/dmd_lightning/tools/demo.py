"""`make demo`: pairs -> fit -> validate on Fashion-MNIST with the shipped teacher, a sample grid and a table.

python -m dmd_lightning.tools.demo [--out runs/demo] [--num-pairs 1000] [--max-time 00:00:08:30] [--ablation]

Every stage goes through the same configs and `dmd` code paths a user runs (configs/fmnist_pairs.yaml and
configs/fmnist.yaml); the flags only scale them down: 1,000 pairs, batch 32, 8.5 minutes, fp32 on the CPU.
--ablation adds the paper's Table 2 variants.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dmd_lightning.cli import cli
from dmd_lightning.data.format import PairDataset
from dmd_lightning.fmnist.fid import FIDEvaluator
from dmd_lightning.generator import OneStepGenerator
from dmd_lightning.images import to_uint8
from dmd_lightning.perf import median_time
from dmd_lightning.samplers import make_scheduler, sample_ode

# name: (overrides, optimizer steps per iteration), so that every variant gets the same generator updates
VARIANTS = {
    "DMD (full)": ([], 2),
    "w/o distribution matching (regression only)": (["--model.init_args.dm_loss.weight", "0"], 1),
    "w/o regression loss": (["--model.init_args.regression_loss", "null"], 2),
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--pairs-config", default="configs/fmnist_pairs.yaml")
    p.add_argument("--config", default="configs/fmnist.yaml")
    p.add_argument("--num-pairs", type=int, default=1000)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--max-time", default="00:00:08:30", help="training time per variant, DD:HH:MM:SS")
    p.add_argument("--iterations", type=int, default=100000, help="generator updates per variant")
    p.add_argument("--val-size", type=int, default=None, help="samples per FID; default and at most --num-pairs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--regression-weight", type=float, default=None, help="default: the config's (the paper's 0.25)")
    p.add_argument("--precision", default=None, help="default: bf16-mixed on a GPU, 32-true on the CPU")
    p.add_argument("--ablation", action="store_true")
    p.add_argument("--accelerator", default="auto")
    a, fit_overrides = p.parse_known_args(argv)  # anything else goes to `dmd fit`, e.g. --model.init_args.optim.fake_lr 1e-4
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    a.val_size = min(a.val_size or a.num_pairs, a.num_pairs)  # teacher and students measured on equal counts
    pairs_dir = out / "pairs"
    gpu = torch.cuda.is_available() and a.accelerator in ("auto", "gpu", "cuda")
    common = ["--trainer.accelerator", a.accelerator]
    precision = ["--trainer.precision", a.precision or ("bf16-mixed" if gpu else "32-true")]
    regression = ["--model.init_args.regression_weight", str(a.regression_weight)] if a.regression_weight is not None else []

    print(f"== 1/3 pairs: {a.num_pairs} teacher samples, {a.sampler} {a.steps} steps -> {pairs_dir}", flush=True)
    start = time.time()
    cli(["pairs", "--config", a.pairs_config, *common, "--data.init_args.out_dir", str(pairs_dir),
         "--data.init_args.num_pairs", str(a.num_pairs), "--data.init_args.shard_size", str(min(500, a.num_pairs)),
         "--model.init_args.sampler", a.sampler, "--model.init_args.num_steps", str(a.steps),
         "--trainer.default_root_dir", str(pairs_dir)])
    print(f"   {time.time() - start:.0f} s", flush=True)
    manifest = PairDataset(pairs_dir).manifest
    settings = {k: manifest[k] for k in ("teacher", "sampler", "num_steps", "guidance_scale")}

    results, modules = {}, {}
    for name, (overrides, steps_per_iteration) in VARIANTS.items() if a.ablation else [("DMD (full)", ([], 2))]:
        slug = name.split(" ")[0].lower().replace("/", "") + str(len(results))
        max_steps = a.iterations * steps_per_iteration
        print(f"== 2/3 fit: {name}, {a.iterations} iterations or {a.max_time} at most", flush=True)
        run = cli(["--config", a.config, *common, *overrides,
                   "--data.init_args.pairs_dir", str(pairs_dir), "--data.init_args.expect", json.dumps(settings),
                   "--data.init_args.val_size", str(a.val_size), "--data.init_args.batch_size", str(a.batch_size),
                   "--data.init_args.pair_batch_size", str(a.batch_size), "--trainer.max_time", a.max_time,
                   *precision, *regression,
                   "--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", "1000000",
                   "--trainer.default_root_dir", str(out / slug), "--trainer.logger.init_args.save_dir", str(out),
                   "--trainer.logger.init_args.name", slug, *fit_overrides], run=False)
        start = time.time()
        run.trainer.fit(run.model, datamodule=run.datamodule)
        results[name] = {"train_s": time.time() - start, "iterations": run.model.iteration}
        modules[name] = run
    print("== 3/3 validate: FID with the project's Fashion-MNIST classifier features", flush=True)
    run = modules["DMD (full)"]
    dm, model = run.datamodule, run.model.eval()
    device = run.trainer.strategy.root_device
    model.to(device)
    evaluator: FIDEvaluator = model.evaluators.ema
    batches = [{k: v.to(device) for k, v in b.items()} for b in dm.val_batches()]

    def fid_of(images: torch.Tensor) -> dict:
        evaluator.reset()
        evaluator.update(images, {})
        return evaluator.compute()

    pairs = PairDataset(pairs_dir)
    table = {f"teacher, {a.sampler} {a.steps} steps (its pairs)": {**fid_of(pairs.x[:a.val_size].float()),
                                                                   "nfe": a.steps}}
    teacher = model.teacher

    def teacher_sample(b):
        return sample_ode(teacher, b["z"], make_scheduler(a.sampler, teacher.schedule.config), a.steps, b.get("cond"))

    b0 = {k: v[:100] for k, v in batches[0].items() if v.ndim}  # timing batch: 100 images, same noise for both
    t_teacher = median_time(lambda: teacher_sample(b0), repeat=1)
    t_gen = model.generator.timestep  # the generator's initialization: the teacher at its timestep
    teacher_one_step = OneStepGenerator(teacher, t_gen)
    with torch.no_grad():
        x_t1 = torch.cat([teacher_one_step(b["z"], b.get("cond")) for b in batches])
    table[f"teacher, one step (x0-prediction at t={t_gen})"] = {**fid_of(x_t1), "nfe": 1}
    for name, r in modules.items():
        m = r.model.to(device).eval()
        with torch.no_grad():  # a K-step student's noise between steps as in validation: the batch's seed and index
            x = torch.cat([m.sample(b["z"], b.get("cond"), True, int(b["seed"]), k) for k, b in enumerate(batches)])
        if name == "DMD (full)":
            t_student = median_time(lambda: m.sample(b0["z"], b0.get("cond")), repeat=3)
        nfe = len(getattr(m.generator_ema, "timesteps", [m.generator_ema]))
        table[f"student: {name}"] = {**fid_of(x), "nfe": nfe, **results[name]}
    n = len(b0["z"])
    table["timing"] = {"teacher_s_per_image": t_teacher / n, "student_s_per_image": t_student / n,
                       "device": str(device), "batch": n}
    grid(model, teacher_sample, teacher_one_step, batches, out / "samples.png")
    (out / "results.json").write_text(json.dumps(table, indent=2))
    print_table(table, a.val_size)
    print(f"\nsample grid: {out / 'samples.png'}; TensorBoard: tensorboard --logdir {out}")
    return table


@torch.no_grad()
def grid(model, teacher_sample, teacher_one_step, batches, path: Path, n: int = 10, zoom: int = 4) -> None:
    """Rows: teacher multi-step, student one-step, teacher one-step; same noise and label per column; each
    32x32 image shown `zoom` times larger (nearest neighbour: the pixels as they are), 1,350 px wide at 10."""
    from torchvision.utils import save_image

    b = {k: v[:n] for k, v in batches[0].items() if v.ndim}  # per sample (not the batch's seed)
    rows = [teacher_sample(b), model.sample(b["z"], b.get("cond")), teacher_one_step(b["z"], b.get("cond"))]
    images = to_uint8(torch.cat(rows)).float().div(255).cpu()
    images = torch.nn.functional.interpolate(images, scale_factor=zoom, mode="nearest")
    save_image(images, path, nrow=n, padding=2 * zoom, pad_value=1.0)


def print_table(table: dict, val_size: int) -> None:
    timing = table.pop("timing")
    print(f"\n{'model':<58} {'NFE':>4} {'FID':>8} {'KID':>8}   (FID/KID on {val_size} samples vs the test set)")
    for name, m in table.items():
        print(f"{name:<58} {m['nfe']:>4} {m['fid']:>8.2f} {m['kid']:>8.4f}")
    print(f"\nwall time per image on {timing['device']} (batch {timing['batch']}): teacher "
          f"{timing['teacher_s_per_image'] * 1e3:.2f} ms, student {timing['student_s_per_image'] * 1e3:.3f} ms "
          f"({timing['teacher_s_per_image'] / timing['student_s_per_image']:.0f}x faster)")
    table["timing"] = timing


if __name__ == "__main__":
    main()
