"""One DMD variant on Fashion-MNIST for a wall-time budget, then FID/KID of its EMA and raw generator.

python scripts/fmnist_variant.py OUT PAIRS_DIR MAX_TIME [dmd fit overrides...]

Runs `dmd fit --config configs/fmnist.yaml` on existing pairs (their sampler settings are read from the
manifest), then `trainer.validate` on the validation seeds, the same code path as `dmd validate`. Writes
OUT/result.json, the EMA generator's UNet as a diffusers folder (OUT/student) and its first validation samples
(OUT/samples.pt, uint8). scripts/gpu_results.sh runs several of these side by side on one GPU.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from dmd_lightning.cli import cli
from dmd_lightning.fmnist import to_uint8
from dmd_lightning.pair_data import PairDataset


def main(out: str, pairs_dir: str, max_time: str, *overrides: str) -> dict:
    out_dir = Path(out)
    manifest = PairDataset(pairs_dir).manifest
    expect = {k: manifest[k] for k in ("teacher", "sampler", "num_steps", "guidance_scale")}
    run = cli(["--config", "configs/fmnist.yaml", "--data.init_args.pairs_dir", pairs_dir,
               "--data.init_args.expect", json.dumps(expect), "--trainer.max_time", max_time,
               "--trainer.max_steps", "100000000", "--trainer.enable_progress_bar", "false",
               "--trainer.default_root_dir", str(out_dir), "--trainer.logger.init_args.save_dir", str(out_dir.parent),
               "--trainer.logger.init_args.name", out_dir.name, *overrides], run=False)
    start = time.time()
    run.trainer.fit(run.model, datamodule=run.datamodule)
    result = {"overrides": list(overrides), "iterations": run.model.iteration, "train_s": round(time.time() - start, 1)}
    (metrics,) = run.trainer.validate(run.model, datamodule=run.datamodule, verbose=False)
    result.update({k: round(float(v), 4) for k, v in metrics.items()})
    model = run.model.eval()
    model.generator_ema.denoiser.unet.save_pretrained(out_dir / "student")
    b = run.datamodule.val_batches()[0]
    with torch.no_grad():
        x = model.sample(b["z"][:20].to(model.device), b["cond"][:20].to(model.device))
    torch.save(to_uint8(x).cpu(), out_dir / "samples.pt")
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    print("RESULT", out_dir.name, json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(*sys.argv[1:])
