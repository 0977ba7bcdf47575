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


def _validate(tmp_path, devices: int) -> tuple[dict, dict]:
    """The toy's untrained generator validated on 300 samples in 3 batches, on `devices` gloo ranks with a TensorBoard
    logger and no checkpoint (the report goes to the logger's folder): the metrics and the written report."""
    from conftest import gloo_ranks, toy_module
    from lightning import seed_everything
    from lightning.pytorch.loggers import TensorBoardLogger

    from dmd_lightning.cli import DMDTrainer
    from dmd_lightning.metrics.report import ValidationReport
    from dmd_lightning.toy2d.mixture import ModeCoverage, ToyDataModule

    seed_everything(0)
    module = toy_module(evaluator=ModeCoverage())
    data = ToyDataModule(num_pairs=16, sampler_steps=2, val_size=300, val_batch_size=100)
    trainer = DMDTrainer(accelerator="cpu", devices=devices, strategy=gloo_ranks() if devices > 1 else "auto",
                         callbacks=[ValidationReport()], logger=TensorBoardLogger(tmp_path / f"devices{devices}"),
                         enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    (path,) = (tmp_path / f"devices{devices}").rglob("validate.json")
    return metrics, json.loads(path.read_text())


def test_two_ranks_score_the_samples_of_one_process_once(tmp_path):
    """3 batches on 2 ranks: DistributedSampler deals batch 0 again to rank 1, which must not be scored or counted;
    the report's folder (trainer.log_dir, a collective) is asked on both ranks, else rank 0 waits forever."""
    one, one_report = _validate(tmp_path, devices=1)
    two, two_report = _validate(tmp_path, devices=2)
    assert one_report["samples"] == two_report["samples"] == 300
    assert one.keys() == two.keys() and len(one) >= 3
    for key in one:
        assert abs(one[key] - two[key]) < 1e-5, (key, one[key], two[key])
