"""Iterations/s and MFU of `configs/fmnist.yaml` (batch 256 + 256, bf16-mixed on a GPU) eager vs compiled vs
compiled with FastMath (TF32, channels-last), then without the per-update host synchronisation (nonfinite.check
logging) and with CUDA graphs (compile mode reduce-overhead), each measured side by side in one process on the
same pairs. A variant that fails is reported as failed and the others still run.

python experiments/fmnist_speed.py [--pairs runs/fmnist/pairs] [--iterations 60] [--tiny]

Each variant runs `dmd fit`'s code path (the config, LightningCLI, the Trainer) for --iterations iterations
without validation; the Throughput callback's last perf/iterations_per_s (the rate over the last
log_every_n_steps iterations, so compilation is outside it) and perf/mfu (on a card Lightning knows) are
printed as a table and written to OUT/speed.json. Pairs missing at --pairs are made first (`dmd pairs`, 2,048
pairs). --tiny: batch 8, 6 iterations, fp32, compile backend aot_eager: a CPU smoke test of the script.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dmd_lightning.cli import cli
from dmd_lightning.perf import FastMath

FAST = FastMath(tf32=True, channels_last=True)
NO_SYNC = ["--model.init_args.nonfinite", '{"check": "logging"}']
VARIANTS = {  # name: (DMDModule overrides, FastMath or None)
    "eager": (["--model.init_args.compile", "null"], None),
    "compiled": ([], None),
    "compiled + TF32 + channels-last": ([], FAST),
    "... + no per-update sync": (NO_SYNC, FAST),
    "... + CUDA graphs": (NO_SYNC + ["--model.init_args.compile.mode", "reduce-overhead"], FAST),
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", default="runs/fmnist/pairs")
    p.add_argument("--out", default="runs/fmnist_speed")
    p.add_argument("--iterations", type=int, default=60)
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args(argv)
    if a.tiny:
        a.iterations = 6
    if not (Path(a.pairs) / "manifest.json").is_file():
        cli(["pairs", "--config", "configs/fmnist_pairs.yaml", "--data.init_args.out_dir", a.pairs,
             "--data.init_args.num_pairs", "64" if a.tiny else "2048", "--data.init_args.shard_size", "64" if a.tiny
             else "1024", *(["--model.init_args.num_steps", "2"] if a.tiny else [])])
    manifest = json.loads((Path(a.pairs) / "manifest.json").read_text())
    expect = {k: manifest[k] for k in ("teacher", "sampler", "num_steps", "guidance_scale")}
    small = ["--data.init_args.batch_size", "8", "--data.init_args.pair_batch_size", "8",
             "--trainer.precision", "32-true"] if a.tiny else []
    every = 2 if a.tiny else 20
    backend = "aot_eager" if a.tiny else "inductor"  # aot_eager: the graphs without code generation
    rows = {}
    for name, (overrides, fast_math) in VARIANTS.items():
        torch.compiler.reset()  # each variant compiles afresh: the graph cache is per code object, shared by all UNets
        run = cli(["--config", "configs/fmnist.yaml", "--data.init_args.pairs_dir", a.pairs,
                   "--data.init_args.expect", json.dumps(expect), "--trainer.max_steps", str(2 * a.iterations),
                   "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
                   "--trainer.enable_progress_bar", "false", "--model.init_args.compile", json.dumps({"backend": backend}),
                   "--trainer.log_every_n_steps", str(every), "--trainer.default_root_dir", a.out,
                   *small, *overrides], run=False)
        run.trainer.callbacks = [c for c in run.trainer.callbacks if type(c).__name__ in ("Throughput",)]
        if fast_math is not None:
            run.trainer.callbacks.append(fast_math)
        try:
            run.trainer.fit(run.model, datamodule=run.datamodule)
        except Exception as e:  # noqa: BLE001 - a failed variant is a result too
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        metrics = run.trainer.callback_metrics
        rows[name] = {k: float(metrics[f"perf/{k}"]) for k in ("iterations_per_s", "samples_per_s", "mfu")
                      if f"perf/{k}" in metrics}
        print(f"{name}: {rows[name]}", flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    eager = rows["eager"].get("iterations_per_s", float("nan"))
    lines = [f"configs/fmnist.yaml on {device}, {a.iterations} iterations per variant", "",
             "| variant | iterations/s | samples/s | MFU | vs eager |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:80]} | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f} %" if "mfu" in r else "-"
        lines.append(f"| {name} | {r.get('iterations_per_s', float('nan')):.2f} | "
                     f"{r.get('samples_per_s', float('nan')):.0f} | {mfu} | "
                     f"{r.get('iterations_per_s', float('nan')) / eager:.2f}x |")
    print("\n".join(lines))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "speed.json").write_text(json.dumps({"device": device, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
