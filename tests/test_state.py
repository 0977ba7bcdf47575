from pathlib import Path

import torch

from dmd_lightning.cli import cli
from dmd_lightning.perf import Compilation


def test_a_checkpoint_with_the_old_compile_and_non_finite_arguments_still_loads(tmp_path, monkeypatch):
    """Checkpoints written before `compile` became a Compilation (a bool and `compile_backend`) and `nonfinite` a
    NonFinite (`on_nonfinite`, `max_consecutive_skips`): their settings carried over, not a type error."""
    monkeypatch.chdir(Path(__file__).parents[1])
    common = ["--config", "configs/toy2d.yaml", "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--data.init_args.num_pairs", "64",
              "--data.init_args.sampler_steps", "4", "--data.init_args.val_size", "64"]
    run = cli(["fit", *common, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"])
    run.trainer.save_checkpoint(tmp_path / "new.ckpt")
    ckpt = torch.load(tmp_path / "new.ckpt", weights_only=False)
    hp = ckpt["hyper_parameters"]
    del hp["nonfinite"]
    hp.update(compile=True, compile_backend="aot_eager", on_nonfinite="stop", max_consecutive_skips=7)
    torch.save(ckpt, tmp_path / "old.ckpt")
    validate = cli(["validate", *common, "--ckpt_path", str(tmp_path / "old.ckpt")])
    assert validate.model.compilation == Compilation(backend="aot_eager")
    assert validate.model.hparams.nonfinite == {"action": "stop", "max_consecutive": 7, "check": "update"}
