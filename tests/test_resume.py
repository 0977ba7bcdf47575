"""`dmd fit` killed with SIGKILL and resumed from its last checkpoint continues the uninterrupted run's losses."""

import csv
import os
import signal
import subprocess
from pathlib import Path

import torch
from lightning import Callback

ROOT = Path(__file__).parents[1]
LOSSES = ("generator/loss_dm", "generator/loss_regression", "fake_score/loss_denoising")


class SIGKILLAt(Callback):
    """Kills its own process, as a crash or a pre-empted job would, before the step `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def dmd_fit(run: Path, max_steps: int, kill_at: int | None = None, resume: bool = False):
    """The toy config, shrunk: checkpoints every 4 steps, validation every 3 iterations, losses to a CSV."""
    kill = f"  - {{class_path: test_resume.SIGKILLAt, init_args: {{step: {kill_at}}}}}" if kill_at else ""
    override = run / f"override-{'resume' if resume else 'first'}.yaml"
    override.write_text(f"""
trainer:
  max_steps: {max_steps}
  val_check_interval: 3
  log_every_n_steps: 1
  enable_progress_bar: false
  default_root_dir: {run}
  callbacks:
  - class_path: lightning.pytorch.callbacks.ModelCheckpoint
    init_args: {{dirpath: {run / 'checkpoints'}, save_last: true, every_n_train_steps: 4}}
{kill}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {run}, name: csv}}
model:
  init_args: {{generator: {{init_args: {{hidden: 32}}}}, evaluator: null, warmup_steps: 3}}
data:
  init_args: {{batch_size: 64, pair_batch_size: 32, num_pairs: 128, sampler_steps: 10, val_size: 256}}
""")
    cmd = ["dmd", "fit", "--config", "configs/toy2d.yaml", "--config", str(override)]
    if resume:
        cmd += ["--ckpt_path", "last"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)


def losses(run: Path) -> dict[int, dict[str, float]]:
    """step -> the losses logged at that step, from every CSV of the run (a resumed run adds a version)."""
    out: dict[int, dict[str, float]] = {}
    for path in sorted(run.glob("csv/version_*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            values = {k: float(row[k]) for k in LOSSES if row.get(k)}
            if values:
                out.setdefault(int(row["step"]), {}).update(values)
    return out


def test_sigkilled_fit_resumes_on_the_uninterrupted_trajectory(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    out = dmd_fit(whole, max_steps=16)
    assert out.returncode == 0, out.stderr[-2000:]
    out = dmd_fit(killed, max_steps=16, kill_at=10)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    ckpt = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 8 and ckpt["dmd_iteration"] == 4
    assert max(losses(killed)) == 4  # steps 5.. (logger steps count iterations) were lost with the process
    out = dmd_fit(killed, max_steps=16, resume=True)
    assert out.returncode == 0, out.stderr[-2000:]
    expected, resumed = losses(whole), losses(killed)
    assert sorted(expected) == list(range(8)) and sorted(resumed) == list(range(8))
    for step in range(4, 8):
        for k in LOSSES:
            torch.testing.assert_close(resumed[step][k], expected[step][k], rtol=1e-6, atol=0, msg=f"{k} at {step}")
