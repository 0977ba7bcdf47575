"""`dmd fit` killed (SIGKILL) or stopped (SIGTERM, in a training step or a validation) and resumed with
`--ckpt_path last`, without a pinned checkpoint folder, continues the uninterrupted run's losses."""

import csv
import os
import signal
import subprocess
from pathlib import Path

import torch
from lightning import Callback

ROOT = Path(__file__).parents[1]
LOSSES = ("generator/loss_dm", "generator/loss_regression", "fake_score/loss_denoising")


class SignalAt(Callback):
    """Sends its own process `signum` (9: a crash or a killed job; 15: a cluster's pre-emption notice) once,
    at the start of the training step `step` or, with in_validation, in the first validation after it."""

    def __init__(self, step: int, signum: int, in_validation: bool = False):
        self.step, self.signum, self.in_validation, self.sent = step, signum, in_validation, False

    def send(self, trainer):
        if trainer.global_step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.in_validation:
            self.send(trainer)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.in_validation:
            self.send(trainer)


def dmd_fit(run: Path, max_steps: int, kill_at: int | None = None, resume: bool = False,
            signum: int = signal.SIGKILL, in_validation: bool = False):
    """The toy config, shrunk: checkpoints every 4 steps, validation every 3 iterations, losses to a CSV."""
    kill = (f"  - {{class_path: test_resume.SignalAt, init_args: {{step: {kill_at}, signum: {int(signum)}, "
            f"in_validation: {str(in_validation).lower()}}}}}") if kill_at else ""
    override = run / f"override-{'resume' if resume else 'first'}.yaml"
    override.write_text(f"""
trainer:
  max_steps: {max_steps}
  val_check_interval: 3
  log_every_n_steps: 1
  enable_progress_bar: false
  default_root_dir: {run}
  callbacks:
  - class_path: dmd_lightning.checkpoint.ModelCheckpoint
    init_args: {{save_last: true, every_n_train_steps: 4}}
{kill}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {run}, name: csv}}
model:
  init_args: {{generator: {{init_args: {{hidden: 32}}}}, evaluator: null, optim: {{warmup_steps: 3}}}}
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


def last_checkpoint(run: Path) -> dict:
    (path,) = run.glob("csv/version_*/checkpoints/last.ckpt")
    return torch.load(path, weights_only=True)


def assert_resumed_exactly(whole: Path, killed: Path, first: int):
    expected, resumed = losses(whole), losses(killed)
    assert sorted(expected) == list(range(8)) and sorted(resumed) == list(range(8))
    for step in range(first, 8):
        for k in LOSSES:
            torch.testing.assert_close(resumed[step][k], expected[step][k], rtol=1e-6, atol=0, msg=f"{k} at {step}")


def test_killed_or_stopped_fits_resume_on_the_uninterrupted_trajectory(tmp_path):
    whole = tmp_path / "whole"
    whole.mkdir()
    out = dmd_fit(whole, max_steps=16)
    assert out.returncode == 0, out.stderr[-2000:]

    killed = tmp_path / "killed"  # SIGKILL: the work since the last periodic checkpoint is lost
    killed.mkdir()
    out = dmd_fit(killed, max_steps=16, kill_at=10)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    ckpt = last_checkpoint(killed)
    assert ckpt["global_step"] == 8 and ckpt["dmd_iteration"] == 4
    assert max(losses(killed)) == 4  # steps 5.. (logger steps count iterations) were lost with the process
    out = dmd_fit(killed, max_steps=16, resume=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resuming from " + str(killed / "csv" / "version_0" / "checkpoints" / "last.ckpt") in out.stderr
    assert_resumed_exactly(whole, killed, 4)
    assert not [p for p in killed.rglob(".*") if "tmp" in p.name]  # no stray temporaries

    for name, in_validation in (("stopped", False), ("stopped_in_validation", True)):
        stopped = tmp_path / name  # SIGTERM: the step (or validation) in progress ends, is saved, exit 143
        stopped.mkdir()
        out = dmd_fit(stopped, max_steps=16, kill_at=10 if not in_validation else 2, signum=signal.SIGTERM,
                      in_validation=in_validation)
        assert out.returncode == 128 + signal.SIGTERM, out.stderr[-2000:]
        ckpt = last_checkpoint(stopped)
        iteration = 6 if not in_validation else 3  # the step begun at global step 10; the validation at 3
        assert ckpt["dmd_iteration"] == iteration and ckpt["global_step"] == 2 * iteration, name
        assert out.stderr.strip().splitlines()[-1] == (
            f"stopped by SIGTERM at global step {2 * iteration}; saved "
            f"{stopped / 'csv' / 'version_0' / 'checkpoints' / 'last.ckpt'}; resume with --ckpt_path last")
        out = dmd_fit(stopped, max_steps=16, resume=True)
        assert out.returncode == 0, out.stderr[-2000:]
        assert_resumed_exactly(whole, stopped, iteration)


def test_ckpt_path_last_without_an_earlier_run_starts_from_scratch_and_says_so(tmp_path):
    out = dmd_fit(tmp_path, max_steps=2, resume=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--ckpt_path last: no earlier checkpoint of this config; starting from scratch" in out.stderr


def test_ckpt_path_last_resumes_with_the_checkpoints_settings_as_an_explicit_path_does(tmp_path):
    """A setting given on the command line at the first launch (here ema_decay) holds in the resumed run."""
    from dmd_lightning.cli import cli

    common = ["--config", str(ROOT / "configs/toy2d.yaml"), "--trainer.default_root_dir", str(tmp_path),
              "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
              "--data.init_args.num_pairs", "64", "--data.init_args.sampler_steps", "4"]
    cli(["fit", *common, "--trainer.max_steps", "2", "--model.init_args.ema_decay", "0.5"])
    for resume in (str(tmp_path / "checkpoints" / "last.ckpt"), "last"):
        model = cli(["fit", *common, "--trainer.max_steps", "4", "--ckpt_path", resume]).model
        assert model.averager.decay == 0.5 and model.hparams.ema_decay == 0.5  # used, and saved in its checkpoints
