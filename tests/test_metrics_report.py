"""`dmd validate` prints one table (metric, value, samples, NFE, s/image) and writes it as JSON beside the checkpoint,
or in the run's folder without one; Lightning's own table is off."""

import json
from pathlib import Path

from dmd_lightning.cli import cli
from dmd_lightning.metrics.report import table

ROOT = Path(__file__).parents[1]


def test_dmd_validate_prints_and_writes_the_table(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    common = ["--config", "configs/toy2d.yaml", "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--data.init_args.num_pairs", "64",
              "--data.init_args.sampler_steps", "4", "--data.init_args.val_size", "64"]
    run = cli(["fit", *common, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"])
    run.trainer.save_checkpoint(tmp_path / "toy.ckpt")
    capsys.readouterr()
    validate = cli(["validate", *common, "--ckpt_path", str(tmp_path / "toy.ckpt")])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "toy.validate.json").read_text())
    metrics = {k: float(v) for k, v in validate.trainer.callback_metrics.items()}
    assert report["metrics"] == metrics and len(metrics) >= 2
    assert report["checkpoint"] == str(tmp_path / "toy.ckpt")
    assert report["samples"] == 64 and report["nfe"] == 1 and 0 < report["seconds_per_image"] < 1
    assert table(report) in out and f"written to {tmp_path / 'toy.validate.json'}" in out
    header, *rows = table(report).splitlines()
    assert header.split() == ["metric", "value", "samples", "NFE", "s/image"] and len(rows) == len(metrics)
    assert "Validate metric" not in out  # Lightning's table: --verbose true

    cli(["validate", *common])  # no checkpoint: the untrained generator, reported in the run's folder
    assert json.loads((tmp_path / "validate.json").read_text())["checkpoint"] is None


def test_table_of_a_model_without_metrics():
    text = table({"samples": 6.0, "nfe": 4, "seconds_per_image": 0.00123456, "metrics": {}})
    assert text.splitlines()[1].split() == ["(none)", "-", "6", "4", "0.001235"]
