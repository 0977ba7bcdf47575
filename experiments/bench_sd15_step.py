"""Seconds per DMD training iteration and peak GPU memory for an SD1.5-architecture UNet at 512x512.

Random weights built from SD1.5's published UNet config (nothing downloaded); bf16 mixed precision; the real
DMDModule stepped by Lightning's Trainer: generator forward + backward (DM loss, guidance 3 on the real side),
teacher forward x2 (CFG), fake forward, fake-score update. The regression term (LPIPS through the VAE) is not
included. python experiments/bench_sd15_step.py [--tiny] [--batch-sizes 1 4 8]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from lightning import Callback, Trainer
from torch.utils.data import DataLoader, IterableDataset

from dmd_lightning import DMDModule, UNetDenoiser, VPSchedule
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


def measure(config: dict, batch: int, checkpointing: bool, iterations: int, warmup: int) -> dict:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init on the GPU: seconds, not minutes
        unet = UNet2DConditionModel(**config)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    schedule = VPSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    null = torch.zeros(1, 77, config["cross_attention_dim"])
    module = DMDModule(UNetDenoiser(unet, schedule, null_embedding=null), guidance_scale=3.0, regression_loss=None)
    timer = StepTimer()
    gpu = torch.cuda.is_available()
    trainer = Trainer(accelerator="gpu" if gpu else "cpu", devices=1, precision="bf16-mixed" if gpu else "32-true",
                      max_steps=2 * (iterations + warmup), logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    data = DataLoader(Synthetic(batch, config["sample_size"], config["cross_attention_dim"]), batch_size=None)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.fit(module, data)
    except torch.OutOfMemoryError:
        return {"batch": batch, "checkpointing": checkpointing, "s_per_iteration": None, "peak_gib": "OOM"}
    times = sorted(timer.times[warmup:])
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan")
    del module, trainer
    torch.cuda.empty_cache() if gpu else None
    return {"batch": batch, "checkpointing": checkpointing, "s_per_iteration": times[len(times) // 2],
            "peak_gib": round(peak, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny UNet of the same layout, for a CPU smoke test")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()
    config = TINY_SD_UNET if a.tiny else SD15_UNET
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"DMD training iteration, SD1.5 UNet layout{' (tiny)' if a.tiny else ''}, 512x512 (64x64 latents), {device}")
    print(f"{'batch':>5} {'grad ckpt':>9} {'s/iteration':>12} {'peak GiB':>9}", flush=True)
    rows = []
    for ckpt in (True, False):  # without checkpointing last: an out-of-memory there cannot spoil the rest
        for b in a.batch_sizes:
            r = measure(config, b, ckpt, a.iterations, a.warmup)
            rows.append(r)
            s = f"{r['s_per_iteration']:.3f}" if r["s_per_iteration"] is not None else "-"
            print(f"{b:>5} {str(ckpt):>9} {s:>12} {r['peak_gib']!s:>9}", flush=True)
    print(json.dumps({"device": device, "rows": rows}))


if __name__ == "__main__":
    main()
