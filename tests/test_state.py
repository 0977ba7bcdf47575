from pathlib import Path

import torch

from dmd_lightning.cli import cli
from dmd_lightning.perf import Compilation


def toy_args(tmp_path) -> list[str]:
    """`dmd` arguments of a quick, quiet toy run under tmp_path (run from the repository root)."""
    return ["--config", "configs/toy2d.yaml", "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--data.init_args.num_pairs", "64",
            "--data.init_args.sampler_steps", "4", "--data.init_args.val_size", "64"]


def test_a_checkpoint_with_the_old_compile_and_non_finite_arguments_still_loads(tmp_path, monkeypatch):
    """Checkpoints written before `compile` became a Compilation (a bool and `compile_backend`) and `nonfinite` a
    NonFinite (`on_nonfinite`, `max_consecutive_skips`): their settings carried over, not a type error."""
    monkeypatch.chdir(Path(__file__).parents[1])
    common = toy_args(tmp_path)
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


def test_a_sharded_checkpoint_folder_gives_its_hyper_parameters_from_its_skeleton(tmp_path, monkeypatch):
    """`--ckpt_path FOLDER` (ShardedCheckpointIO) restores the run's settings as a file does, reading the folder's
    skeleton for them, not its shards."""
    import safetensors.torch

    from dmd_lightning.checkpoint import save_sharded

    monkeypatch.chdir(Path(__file__).parents[1])
    common = toy_args(tmp_path)
    run = cli(["fit", *common, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"])
    run.trainer.save_checkpoint(tmp_path / "file.ckpt")
    ckpt = torch.load(tmp_path / "file.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["nonfinite"] = {"action": "stop", "max_consecutive": 7, "check": "update"}
    save_sharded(ckpt, tmp_path / "folder.ckpt")
    loads, load_file = [], safetensors.torch.load_file
    monkeypatch.setattr("dmd_lightning.checkpoint.sharded.load_file",
                        lambda *a, **kw: loads.append(a) or load_file(*a, **kw))
    validate = cli(["validate", *common, "--trainer.plugins", "dmd_lightning.checkpoint.ShardedCheckpointIO",
                    "--ckpt_path", str(tmp_path / "folder.ckpt")])
    assert validate.model.hparams.nonfinite == {"action": "stop", "max_consecutive": 7, "check": "update"}
    shards = list((tmp_path / "folder.ckpt").glob("*.safetensors"))
    assert len(loads) == len(shards)  # the trainer's load of the weights; the hyper-parameters' read took none



def test_another_accumulation_resumes_at_the_same_update_and_says_so(tmp_path):
    import pytest
    from conftest import fit, toy_module

    trained = toy_module(optim={"accumulate": 2})
    trainer = fit(trained, max_steps=6, tmp_path=tmp_path)  # 3 updates of both networks, 6 batches
    trainer.save_checkpoint(tmp_path / "acc2.ckpt")
    checkpoint = torch.load(tmp_path / "acc2.ckpt", weights_only=True)
    assert checkpoint["dmd_iteration"] == 6 and checkpoint["dmd_accumulate"] == 2
    resumed = toy_module(optim={"accumulate": 4})
    with pytest.warns(UserWarning, match="accumulate 4 where the checkpoint has 2"):
        resumed.on_load_checkpoint(checkpoint)
    assert resumed.iteration == 12 and not resumed.mid_update  # update 3, at its boundary
