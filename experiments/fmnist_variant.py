"""One DMD variant on Fashion-MNIST for a wall-time budget, then FID/KID of its EMA and raw generator.

[RESUME=CKPT] python experiments/fmnist_variant.py OUT PAIRS_DIR MAX_TIME [dmd fit overrides...]

Runs `dmd fit --config $CONFIG` (default configs/fmnist.yaml) on existing pairs (their sampler settings are read
from the manifest; PAIRS_DIR `none` for the DMD2 configs, which take none) for the config's iterations (or
MAX_TIME, whichever ends first), then `trainer.validate` (the code path of `dmd validate`) on the validation seeds
(val_seed 1: `val/...`) and on the report seeds (val_seed 2: `test/...`, never looked at while choosing settings).
RESUME continues a run from its checkpoint (same config and overrides) into OUT; MAX_TIME then counts the
checkpoint's training time as well. Writes OUT/result.json, the EMA generator's UNet as a diffusers folder in
float16 (OUT/student) and its first validation samples (OUT/samples.pt, uint8).
experiments/fmnist_results.sh runs several of these side by side.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
from fmnist_summary import fid_curve  # experiments/, this script's folder

from dmd_lightning.cli import cli
from dmd_lightning.data.format import PairDataset
from dmd_lightning.images import to_uint8

REPORT_SEED = 2  # the noise of the reported figures; configs/fmnist.yaml validates on val_seed 1


def main(out: str, pairs_dir: str, max_time: str, *overrides: str) -> dict:
    out_dir = Path(out)
    pairs = []
    if pairs_dir != "none":
        manifest = PairDataset(pairs_dir).manifest
        expect = {k: manifest[k] for k in ("teacher", "sampler", "num_steps", "guidance_scale")}
        pairs = ["--data.init_args.pairs_dir", pairs_dir, "--data.init_args.expect", json.dumps(expect)]
    run = cli(["--config", os.environ.get("CONFIG", "configs/fmnist.yaml"), *pairs, "--trainer.max_time", max_time,
               "--trainer.enable_progress_bar", "false",
               "--trainer.default_root_dir", str(out_dir), "--trainer.logger.init_args.save_dir", str(out_dir.parent),
               "--trainer.logger.init_args.name", out_dir.name, *overrides], run=False)
    start = time.time()
    run.trainer.fit(run.model, datamodule=run.datamodule, ckpt_path=os.environ.get("RESUME"))
    result = {"config": os.environ.get("CONFIG", "configs/fmnist.yaml"), "overrides": list(overrides),
              "resumed_from": os.environ.get("RESUME"),
              "iterations": run.model.iteration, "train_s": round(time.time() - start, 1),
              "steps": list(getattr(run.model.generator, "timesteps", [999]))}
    (metrics,) = run.trainer.validate(run.model, datamodule=run.datamodule, verbose=False)
    result.update({k: round(float(v), 4) for k, v in metrics.items()})
    b = run.datamodule.val_batches()[0]
    with torch.no_grad():
        x = run.model.eval().sample(b["z"][:20].to(run.model.device), b["cond"][:20].to(run.model.device))
    torch.save(to_uint8(x).cpu(), out_dir / "samples.pt")
    run.datamodule.hparams.val_seed = REPORT_SEED
    (metrics,) = run.trainer.validate(run.model, datamodule=run.datamodule, verbose=False)
    result.update({k.replace("val/", "test/", 1): round(float(v), 4) for k, v in metrics.items()})
    model = run.model.eval()
    unet = copy.deepcopy(model.generator_ema.denoiser.unet).to(torch.float16)
    unet.save_pretrained(out_dir / "student")
    result["curve"] = fid_curve(out_dir)  # (iteration, EMA val/fid) of the validations during training
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    print("RESULT", out_dir.name, json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(*sys.argv[1:])
