"""Seconds per DMD training iteration, MFU and peak GPU memory for an SD1.5-architecture UNet at 512x512, with the
networks eager and compiled (DMDModule(compile=Compilation(mode=...))) side by side.

Random weights built from SD1.5's published UNet config (nothing downloaded); bf16 mixed precision; the real
DMDModule stepped by Lightning's Trainer: generator forward + backward (DM loss, guidance 3 on the real side),
teacher forward x2 (CFG), fake forward, fake-score update. The regression term (LPIPS through the VAE) is not
included. FLOPs per iteration: counted with torch.utils.flop_counter on the eager run's first iteration
(perf.Throughput), the same for the compiled one; with gradient checkpointing they include the recomputed
forward passes (hardware FLOPs, a little above the model's). MFU against the card's dense bf16 peak
(perf.DENSE_PEAKS). All eager rows run before the compiled ones; a row that fails says so and the others run.
python experiments/bench_sd15_step.py [--tiny] [--batch-sizes 1 4 8 16] [--no-compile] [--compile-mode reduce-overhead]
    [--no-checkpointing-too]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from lightning import Callback, Trainer
from torch.utils.data import DataLoader, IterableDataset

from dmd_lightning import DMDModule, DMLoss, UNetDenoiser, VPSchedule
from dmd_lightning.perf import Compilation, Throughput, peak_flops
from dmd_lightning.tools.bench_cases import SD15_UNET, TINY_SD_UNET


class Synthetic(IterableDataset):
    def __init__(self, batch: int, size: int, dim: int):
        self.batch, self.size, self.dim = batch, size, dim

    def __iter__(self):
        while True:
            yield {"z": torch.randn(self.batch, 4, self.size, self.size), "cond": torch.randn(self.batch, 77, self.dim)}


class StepTimer(Callback):
    def __init__(self):
        self.times = []

    def on_train_batch_start(self, *args):
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args):
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        self.times.append(time.perf_counter() - self.start)


def measure(config: dict, batch: int, checkpointing: bool, iterations: int, warmup: int, compile: bool = False,
            compile_mode: str | None = None) -> dict:
    from diffusers import UNet2DConditionModel

    torch.compiler.reset()  # graphs of earlier rows (other batch sizes) would count towards the recompile limit
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init on the GPU: seconds, not minutes
        unet = UNet2DConditionModel(**config)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    schedule = VPSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    null = torch.zeros(1, 77, config["cross_attention_dim"])
    module = DMDModule(UNetDenoiser(unet, schedule, null_embedding=null), dm_loss=DMLoss(guidance_scale=3.0), regression_loss=None,
                       compile=Compilation(mode=compile_mode) if compile else None)
    timer, perf = StepTimer(), Throughput()
    gpu = torch.cuda.is_available()
    trainer = Trainer(accelerator="gpu" if gpu else "cpu", devices=1, precision="bf16-mixed" if gpu else "32-true",
                      max_steps=2 * (iterations + warmup), logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[timer] if compile else [timer, perf])
    data = DataLoader(Synthetic(batch, config["sample_size"], config["cross_attention_dim"]), batch_size=None)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.fit(module, data)
    except Exception as err:  # out of memory, or a compile / CUDA-graph failure: the row says so, the others run
        failure = "OOM" if isinstance(err, torch.OutOfMemoryError) else "failed"
        print(f"{failure}: batch {batch}, compiled {compile}: {type(err).__name__}: {str(err).splitlines()[0][:200]}",
              flush=True)
        del module, trainer
        torch.cuda.empty_cache() if gpu else None
        return {"batch": batch, "checkpointing": checkpointing, "compiled": compile, "s_per_iteration": None,
                "peak_gib": failure, "flops": None}
    times = sorted(timer.times[warmup:])
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan")
    del module, trainer
    torch.cuda.empty_cache() if gpu else None
    return {"batch": batch, "checkpointing": checkpointing, "compiled": compile, "s_per_iteration": times[len(times) // 2],
            "peak_gib": round(peak, 1), "flops": perf.flops_per_iteration}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny UNet of the same layout, for a CPU smoke test")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="eager rows only")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode of the compiled rows, e.g. reduce-overhead")
    p.add_argument("--no-checkpointing-too", action="store_true", help="also rows without gradient checkpointing")
    a = p.parse_args()
    config = TINY_SD_UNET if a.tiny else SD15_UNET
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak_flops(torch.device("cuda" if torch.cuda.is_available() else "cpu"), "bf16-mixed")
    print(f"DMD training iteration, SD1.5 UNet layout{' (tiny)' if a.tiny else ''}, 512x512 (64x64 latents), {device}")
    print(f"{'batch':>5} {'grad ckpt':>9} {'compiled':>8} {'s/iteration':>12} {'TFLOP/it':>9} {'MFU':>6} "
          f"{'x eager':>8} {'peak GiB':>9}", flush=True)
    rows = []

    def report(r: dict, eager: dict) -> None:  # each row when measured: a run cut off at its deadline keeps them
        s, f = r["s_per_iteration"], r["flops"]
        r["mfu"] = f / s / peak if s and f and peak else None
        r["speedup"] = eager["s_per_iteration"] / s if s and eager["s_per_iteration"] else None
        cells = [f"{s:.3f}" if s else "-", f"{f / 1e12:.2f}" if f else "-",
                 f"{r['mfu']:.1%}" if r["mfu"] else "-", f"{r['speedup']:.2f}" if r["speedup"] else "-"]
        print(f"{r['batch']:>5} {str(r['checkpointing']):>9} {str(r['compiled']):>8} {cells[0]:>12} {cells[1]:>9} "
              f"{cells[2]:>6} {cells[3]:>8} {r['peak_gib']!s:>9}", flush=True)
        rows.append(r)

    for ckpt in (True, False) if a.no_checkpointing_too else (True,):  # an out-of-memory without it comes last
        eager = {}
        for b in a.batch_sizes:  # every eager row first: compiling (minutes, cold) must not cost them their time
            eager[b] = measure(config, b, ckpt, a.iterations, a.warmup)
            report(eager[b], eager[b])
        for b in [] if a.no_compile else a.batch_sizes:
            compiled = measure(config, b, ckpt, a.iterations, a.warmup, compile=True, compile_mode=a.compile_mode)
            compiled["flops"] = eager[b]["flops"]  # the same math (its Throughput is left out: it is not timed)
            report(compiled, eager[b])
    print(json.dumps({"device": device, "rows": rows}))


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # after compiling with CUDA-graph modes the interpreter has been seen to hang at exit
