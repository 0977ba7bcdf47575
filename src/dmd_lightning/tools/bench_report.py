"""The report of `make bench`: the machine it ran on and the markdown tables of bench.py's results."""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path

import torch

DMD_STEP_TARGET = 1.15  # a Trainer-driven iteration costs at most this times the sum of its network passes
PAIRS_TARGET = 1.0  # PairGenerator at least as fast as diffusers' own loop


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), platform.processor())
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": gpu or "cpu", "precision": "bf16 autocast" if gpu else "float32"}


def table(title: str, header: list[str], rows: list[list]) -> list[str]:
    """A markdown table; the first column left-aligned, the others right-aligned."""
    return ["", f"## {title}", "", "| " + " | ".join(header) + " |",
            "| --- |" + " ---: |" * (len(header) - 1), *("| " + " | ".join(map(str, r)) + " |" for r in rows)]


def markdown(results: dict, m: dict) -> str:
    def ratio(v: float, met: bool | None = None, digits: int = 2) -> str:
        text = f"{v:.{digits}f}" if math.isfinite(v) else "-"
        return text if met is None else f"{text} ({'met' if met else 'NOT met'})"

    ms, mib = (lambda s: f"{s * 1e3:.1f} ms"), (lambda n: f"{n / 2**20:.1f} MiB")
    r = results
    lines = [f"# make bench: ratios measured side by side ({m['device']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} CPU threads), device "
             f"{m['device']}, {m['precision']}. Each figure: the median of several repetitions after a warm-up."]
    lines += table("1. One-step generation vs the teacher's sampler (same batch and noise)",
                   ["model", "sampler", "batch", "one step", "sampler", "wall ratio", "NFE ratio (the limit)",
                    "wall / NFE"],
                   [[k, o["sampler"], o["batch"], ms(o["one_step_s"]), ms(o["sampler_s"]), ratio(o["wall_ratio"], None, 1) + "x",
                     ratio(o["nfe_ratio"], None, 0) + "x", ratio(o["wall_over_nfe"])] for k, o in
                    ((k, v["one_step"]) for k, v in r.items())])
    lines += table("2. DMD training iteration (Lightning Trainer) vs the sum of its network passes, each timed alone",
                   ["model", "batch", *next(iter(r.values()))["dmd_step"]["passes_s"], "sum", "iteration",
                    f"ratio (target <= {DMD_STEP_TARGET})"],
                   [[k, d["batch"], *map(ms, d["passes_s"].values()), ms(d["sum_s"]), ms(d["step_s"]),
                     ratio(d["ratio"], d["met"])] for k, d in ((k, v["dmd_step"]) for k, v in r.items())])
    lines += table("3. Pair generation: PairGenerator vs diffusers (same UNet, scheduler, steps, batch and noise)",
                   ["model", "diffusers side", "sampler", "batch", "project img/s", "diffusers img/s",
                    f"ratio (target >= {PAIRS_TARGET})", "max abs diff"],
                   [[k, p["reference"], p["sampler"], p["batch"], f"{p['project_images_per_s']:.2f}",
                     f"{p['reference_images_per_s']:.2f}", ratio(p["ratio"], p["met"]), f"{p['max_abs_diff']:.1e}"]
                    for k, p in ((k, v["pairs"]) for k, v in r.items())])
    lines += table("4. Peak memory of a DMD training step, gradient checkpointing on vs off",
                   ["model", "measure", "with", "without", "with / without"],
                   [[k, x["kind"], mib(x["with_checkpointing_bytes"]), mib(x["without_checkpointing_bytes"]),
                     ratio(x["ratio"])] for k, x in ((k, v["memory"]) for k, v in r.items())])
    lines += table("5. The generator's training state, LoRA vs full fine-tuning: parameters + gradients + AdamW state "
                   "(exact bytes after one update; activations not counted)",
                   ["model", "UNet", "full", "LoRA", "rank", "LoRA / full"],
                   [[k, x["unet"], mib(sum(x["full"].values())), mib(sum(x["lora"].values())), x["rank"],
                     ratio(x["ratio"])] for k, x in ((k, v["lora"]) for k, v in r.items())])
    compiled = [(label, v[key]) for k, v in r.items() for key, label in (("compile", k), ("compile_dmd2", f"{k} DMD2"))
                if key in v]
    if compiled:
        lines += table("6. A DMD iteration with the networks compiled (torch.compile) vs eager (below 1: faster)",
                       ["model", "batch", "backend", "eager", "compiled", "compiled / eager", "compilation"],
                       [[k, x["batch"], x["backend"], ms(x["eager_s"]), ms(x["compiled_s"]), ratio(x["ratio"]),
                         f"{x['compile_s']:.0f} s"] for k, x in compiled])
    return "\n".join(lines) + "\n"
