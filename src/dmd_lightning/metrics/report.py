"""ValidationReport: what `dmd validate` prints and keeps, one row per metric (value, samples, NFE, s/image)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning import Callback

from dmd_lightning.perf import median_time
from dmd_lightning.rng import repeated_batch


class ValidationReport(Callback):
    """Counts the validation samples; after validation, times the generator on the first batch again (its
    `sample`, as validation calls it, once the validation has warmed it up) and writes the table as JSON:
    `<checkpoint stem>.validate.json` beside the checkpoint, else `validate.json` in the log (or root) dir.

    NFE: network evaluations per sample (the generator's number of timesteps; 1 for a generator without).
    s/image: seconds per sample of that batch, sampling only, not scoring."""

    def __init__(self):
        self.samples, self.first = 0, None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.samples, self.first = 0, None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or not isinstance(batch, dict) or "z" not in batch:
            return  # only generators' validation batches ({z, cond}) are counted
        if repeated_batch(pl_module, batch_idx):
            return  # DistributedSampler's padding, not scored
        self.samples += len(batch["z"])
        if self.first is None:
            self.first = batch

    def seconds_per_image(self, trainer, pl_module) -> float | None:
        if self.first is None or not hasattr(pl_module, "sample"):
            return None
        z = self.first["z"]
        with trainer.precision_plugin.forward_context():  # as validation ran it (autocast under bf16-mixed)
            seconds = median_time(lambda: pl_module.sample(z, self.first.get("cond")), repeat=1, warmup=0)
        return seconds / len(z)

    def on_validation_end(self, trainer, pl_module) -> None:
        generator = getattr(pl_module, "generator_ema", None)
        report = {
            "checkpoint": trainer.ckpt_path,
            "samples": trainer.strategy.reduce(torch.tensor(float(self.samples), device=pl_module.device), reduce_op="sum").item(),
            "nfe": len(getattr(generator, "timesteps", (0,))) if generator is not None else None,
            "seconds_per_image": self.seconds_per_image(trainer, pl_module),
            "metrics": {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val")},
        }
        path = report_path(trainer)  # on every rank: trainer.log_dir is a collective (a broadcast)
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2) + "\n")
            print(table(report) + f"\n(written to {path})")


def report_path(trainer) -> Path:
    if trainer.ckpt_path and Path(trainer.ckpt_path).is_file():
        ckpt = Path(trainer.ckpt_path)
        return ckpt.with_name(f"{ckpt.stem}.validate.json")
    return Path(trainer.log_dir or trainer.default_root_dir) / "validate.json"


def table(report: dict) -> str:
    """The report as aligned text columns: metric, value, samples, NFE, s/image."""
    def fmt(v) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    rows = [["metric", "value", "samples", "NFE", "s/image"]]
    common = [fmt(int(report["samples"])), fmt(report["nfe"]), fmt(report["seconds_per_image"])]
    rows += [[k, fmt(v), *common] for k, v in report["metrics"].items()] or [["(none)", "-", *common]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)
