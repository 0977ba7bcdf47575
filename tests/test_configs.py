"""Every file under configs/ parses; those whose weights ship with the project are instantiated as they are
(model, data and trainer built); the toy config runs end to end through the `dmd` command. The Stable Diffusion
configs are instantiated and run in test_sd.py, with a tiny pipeline standing in for the hub weights."""

import subprocess
import sys
from pathlib import Path

import pytest

from dmd_lightning.checkpoint import CheckpointIO
from dmd_lightning.cli import cli

CONFIGS = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "model:" in capsys.readouterr().out


SHIPPED = {  # config -> (model class, data class) its instantiation must give
    "toy2d.yaml": ("DMDModule", "ToyDataModule"),
    "fmnist.yaml": ("DMDModule", "DMDDataModule"),
    "fmnist_dmd2.yaml": ("DMDModule", "DMDDataModule"),
    "fmnist_dmd2_4step.yaml": ("DMDModule", "DMDDataModule"),
    "fmnist_pairs.yaml": ("PairGenerator", "PairGenerationDataModule"),
    "fmnist_teacher.yaml": ("TeacherModule", "FashionMNISTDataModule"),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_config_instantiates(name, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])
    run = cli(["--config", f"configs/{name}", "--trainer.default_root_dir", str(tmp_path),
               "--trainer.accelerator", "cpu"], run=False)
    assert (type(run.model).__name__, type(run.datamodule).__name__) == SHIPPED[name]
    assert isinstance(run.trainer.strategy.checkpoint_io, CheckpointIO)  # checkpoints renamed into place


def test_unknown_config_key_is_one_clear_error(tmp_path):
    cmd = [sys.executable, "-m", "dmd_lightning.cli", "fit", "--config", str(CONFIGS[0]), "--model.no_such_key", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith("error: Parser key \"model\": Option 'no_such_key' is not accepted"), out.stderr


def test_dmd_fit_runs_the_toy_config(tmp_path):
    cmd = ["dmd", "fit", "--config", "configs/toy2d.yaml", "--trainer.max_steps", "20", "--trainer.val_check_interval", "10",
           "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
           "--trainer.enable_progress_bar", "false"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert list(tmp_path.rglob("*.ckpt")) and list(tmp_path.rglob("events.out.tfevents*"))
    # quiet by default: no warning about the project's own choices reaches the user (dmd_lightning.quiet)
    noise = [line for line in out.stderr.splitlines() if any(w in line.lower() for w in (
        "warn", "deprecat", "tip:", "accelerate", "weights_only", "eval mode at the start", "workers"))]
    assert not noise, noise
