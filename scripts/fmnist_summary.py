"""The teacher's FID from its pairs, and the grid and table of the variants of scripts/gpu_results.sh.

python scripts/fmnist_summary.py teacher PAIRS_DIR OUT_JSON        FID/KID of the pairs' teacher images
python scripts/fmnist_summary.py grid PAIRS_DIR OUT_PNG RUN_DIR...  rows: teacher (the pairs' sampler), then each
                                                                   run's EMA generator; same seeds and labels
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml

from dmd_lightning import PretrainedUNetDenoiser
from dmd_lightning.data import DMDDataModule
from dmd_lightning.fid import FIDEvaluator
from dmd_lightning.fmnist import to_uint8
from dmd_lightning.pair_data import PairDataset
from dmd_lightning.samplers import make_scheduler, sample_ode


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

    m = PairDataset(pairs_dir).manifest
    dm = DMDDataModule(pairs_dir)  # the default validation seeds and labels, as in the runs
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


if __name__ == "__main__":
    {"teacher": teacher, "grid": grid}[sys.argv[1]](*sys.argv[2:])
