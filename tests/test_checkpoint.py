import argparse
import enum
import json
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from conftest import fit, toy_module
from lightning import LightningModule, Trainer
from lightning.fabric.utilities.data import AttributeDict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dmd_lightning.checkpoint import (
    CheckpointIO,
    ModelCheckpoint,
    ShardedCheckpointIO,
    find_last_checkpoint,
    load_sharded,
    save_sharded,
)
from dmd_lightning.cli import cli
from dmd_lightning.errors import CheckpointError
from dmd_lightning.perf import Compilation


def test_last_checkpoint_holds_the_final_step_between_periodic_saves(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4)
    fit(toy_module(), max_steps=6, tmp_path=tmp_path, callbacks=[ckpt])  # periodic save at 4 only
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6 and last["dmd_iteration"] == 3
    assert (tmp_path / "ckpt" / "epoch=0-step=4.ckpt").is_file()


def test_periodic_saves_of_the_manually_optimized_module_do_not_warn_about_post_step_state(tmp_path, recwarn):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2)
    fit(toy_module(), max_steps=4, tmp_path=tmp_path, callbacks=[ckpt])
    assert (tmp_path / "ckpt" / "epoch=0-step=4.ckpt").is_file()
    assert not [w for w in recwarn if "pre-optimization state" in str(w.message)]


# ShardedCheckpointIO: checkpoints as folders of small, pickle-free files

KIB4 = 4096


def assert_same(a, b, where="obj"):
    """Equal values of equal types, tensors bit for bit with their dtype and shape."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def nested_tensors():
    base = torch.randn(6, 5)
    state = OrderedDict(weight=torch.randn(40, 30), bias=base[0])  # 4,800 bytes: split over two 4 KiB files
    state._metadata = OrderedDict({"": {"version": 1}})
    return {
        "state_dict": state,
        "dtypes": [torch.randn(9).bfloat16(), torch.randn(3).half(), torch.arange(7), torch.arange(5).to(torch.uint8),
                   torch.tensor([True, False]), torch.randn(2, 2, dtype=torch.float64)],
        "views": (base, base.t(), base[:, 1], torch.tensor(3.0), torch.zeros(0, 4)),  # shared, non-contiguous, empty
        "optimizer_states": [{"state": {0: {"step": torch.tensor(4.0)}}, "param_groups": [{"betas": (0.9, 0.99)}]}],
        "plain": {"lr": 1e-3, "name": "x", "none": None, "flag": True, "ids": {1, 2}, "dtype": torch.bfloat16,
                  "size": torch.Size([2, 3])},
    }


def test_sharded_round_trip_keeps_structure_dtypes_and_every_file_within_the_limit(tmp_path):
    obj = nested_tensors()
    save_sharded(obj, tmp_path / "last.ckpt", max_shard_bytes=KIB4)
    files = sorted(p.name for p in (tmp_path / "last.ckpt").iterdir())
    assert files[:2] == ["index.json", "skeleton.pt"] and len(files) >= 4, files
    assert all(p.stat().st_size <= KIB4 for p in (tmp_path / "last.ckpt").iterdir())
    index = json.loads((tmp_path / "last.ckpt" / "index.json").read_text())
    assert sorted(index["files"]) == files[1:] and index["total_bytes"] == sum(index["files"].values())
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temporary or old folder left
    loaded = load_sharded(tmp_path / "last.ckpt")
    assert_same(loaded, obj)
    assert loaded["state_dict"]._metadata == obj["state_dict"]._metadata  # what load_state_dict reads versions from
    skeleton = torch.load(tmp_path / "last.ckpt" / "skeleton.pt", weights_only=True)
    assert skeleton["state_dict"]["weight"]["shape"] == [40, 30]  # the tensors are markers here
    assert not any(isinstance(v, torch.Tensor) for v in skeleton["dtypes"])


def test_hyper_parameter_containers_become_dicts_and_other_objects_fail_naming_their_key(tmp_path):
    obj = {"hyper_parameters": AttributeDict(width=3, args=argparse.Namespace(lr=0.1)), "w": torch.ones(2)}
    save_sharded(obj, tmp_path / "a.ckpt", KIB4)
    assert load_sharded(tmp_path / "a.ckpt")["hyper_parameters"] == {"width": 3, "args": {"lr": 0.1}}

    class Mode(enum.IntEnum):
        FAST = 1

    with pytest.raises(TypeError, match=r"checkpoint\['hyper_parameters'\]\['mode'\].*Mode.*weights_only"):
        save_sharded({"w": torch.ones(2), "hyper_parameters": {"mode": Mode.FAST}}, tmp_path / "b.ckpt", KIB4)
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt"]  # nothing half-written left behind


def test_missing_or_corrupt_shards_are_named(tmp_path):
    save_sharded(nested_tensors(), tmp_path / "c.ckpt", KIB4)
    shard = tmp_path / "c.ckpt" / "tensors-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(b"\xff" * len(data))
    with pytest.raises(ValueError, match="tensors-00001.safetensors is corrupt"):
        load_sharded(tmp_path / "c.ckpt")
    shard.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="tensors-00001.safetensors has .* truncated"):
        load_sharded(tmp_path / "c.ckpt")
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="tensors-00001.safetensors is missing"):
        load_sharded(tmp_path / "c.ckpt")
    with pytest.raises(CheckpointError, match="tensors-00001.safetensors is missing"):  # one line from `dmd`
        ShardedCheckpointIO().load_checkpoint(tmp_path / "c.ckpt")


def test_a_crash_during_the_swap_leaves_a_loadable_checkpoint(tmp_path):
    obj, io = nested_tensors(), ShardedCheckpointIO(KIB4)
    io.save_checkpoint(obj, tmp_path / "last.ckpt")
    os.rename(tmp_path / "last.ckpt", tmp_path / ".last.ckpt.old")  # killed between the two renames
    (tmp_path / ".last.ckpt.tmp-99").mkdir()  # and a half-written folder of another crash
    (tmp_path / ".last.ckpt.tmp-99" / "tensors-00000.safetensors").write_bytes(b"partial")
    assert_same(io.load_checkpoint(tmp_path / "last.ckpt"), obj)
    io.save_checkpoint({"step": 2}, tmp_path / "last.ckpt")  # the next save cleans up
    assert os.listdir(tmp_path) == ["last.ckpt"] and io.load_checkpoint(tmp_path / "last.ckpt") == {"step": 2}
    io.remove_checkpoint(tmp_path / "last.ckpt")
    assert os.listdir(tmp_path) == []


def test_single_file_checkpoints_still_load_and_only_without_pickled_code(tmp_path):
    io = ShardedCheckpointIO()
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, tmp_path / "plain.ckpt")
    assert io.load_checkpoint(tmp_path / "plain.ckpt")["global_step"] == 3
    torch.save({"hparams": argparse.Namespace(lr=1)}, tmp_path / "pickled.ckpt")
    with pytest.raises(Exception, match="weights_only"):
        io.load_checkpoint(tmp_path / "pickled.ckpt", weights_only=False)
    with pytest.raises(CheckpointError, match="none.ckpt' does not exist"):
        io.load_checkpoint(tmp_path / "none.ckpt")


class LinearModule(LightningModule):
    """Adam on one linear layer, one full batch per epoch: every run sees the same batches whenever it resumes."""

    def __init__(self, width: int = 48):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(width, width)  # 9,216 bytes of weight: split over 8 KiB files

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        w = self.hparams.width
        data = TensorDataset(torch.randn(16, w, generator=g), torch.randn(16, w, generator=g))
        return DataLoader(data, batch_size=16)


def fit_linear(root: Path, max_steps: int, ckpt_path=None) -> tuple[Trainer, LinearModule]:
    torch.manual_seed(0)
    model = LinearModule()
    trainer = Trainer(max_steps=max_steps, plugins=[ShardedCheckpointIO(max_shard_bytes=8192)], accelerator="cpu",
                      callbacks=[ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=4)],
                      logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model


def test_lightning_writes_folders_and_resumes_from_them_as_if_never_stopped(tmp_path):
    trainer, model = fit_linear(tmp_path / "a", max_steps=6)  # periodic saves at step 4, last.ckpt at 4 and 6
    ckpt = tmp_path / "a" / "ckpt"
    assert sorted(os.listdir(ckpt)) == ["epoch=3-step=4.ckpt", "last.ckpt"] and (ckpt / "last.ckpt").is_dir()
    assert all(f.stat().st_size <= 8192 for f in (ckpt / "last.ckpt").iterdir())
    saved = ShardedCheckpointIO().load_checkpoint(ckpt / "last.ckpt")
    assert saved["global_step"] == 6 and saved["hyper_parameters"] == {"width": 48}
    assert_same(saved["state_dict"], model.state_dict())
    assert_same(saved["optimizer_states"][0], trainer.optimizers[0].state_dict())

    resumed, resumed_model = fit_linear(tmp_path / "a", max_steps=10, ckpt_path=ckpt / "last.ckpt")
    _, straight = fit_linear(tmp_path / "b", max_steps=10)
    assert resumed.global_step == 10
    assert_same(resumed_model.state_dict(), straight.state_dict())

    os.rename(ckpt / "last.ckpt", ckpt / ".last.ckpt.old")  # a crash mid-swap; `--ckpt_path last` still finds it
    assert find_last_checkpoint(trainer) == str(ckpt / ".last.ckpt.old")
    again, _ = fit_linear(tmp_path / "a", max_steps=11, ckpt_path=ckpt / "last.ckpt")  # loads the .old sibling
    assert again.global_step == 11
    assert sorted(os.listdir(ckpt)) == ["epoch=7-step=8.ckpt", "last.ckpt"]  # top-1 folder replaced, .old gone


def test_the_dmd_module_checkpoints_through_the_plugin(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4)
    fit(toy_module(), max_steps=6, tmp_path=tmp_path, callbacks=[ckpt], plugins=[ShardedCheckpointIO(32 * 1024)])
    last = ShardedCheckpointIO().load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert last["global_step"] == 6 and last["dmd_iteration"] == 3
    files = list((tmp_path / "ckpt" / "last.ckpt").iterdir())
    assert len(files) >= 5 and all(f.stat().st_size <= 32 * 1024 for f in files)


def test_the_plugin_is_configured_from_yaml(tmp_path):
    override = tmp_path / "plugin.yaml"
    override.write_text(f"""trainer:
  plugins:
  - class_path: dmd_lightning.checkpoint.ShardedCheckpointIO
    init_args: {{max_shard_bytes: {KIB4}}}
  logger: false
  default_root_dir: {tmp_path}
""")
    toy = Path(__file__).parents[1] / "configs" / "toy2d.yaml"
    io = cli(["--config", str(toy), "--config", str(override)], run=False).trainer.strategy.checkpoint_io
    assert isinstance(io, ShardedCheckpointIO) and io.max_shard_bytes == KIB4


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    io = CheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 1}, tmp_path / "last.ckpt")
    (tmp_path / ".last.ckpt.tmp-99").write_bytes(b"half of a checkpoint of a killed process")

    def dies(obj, path):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt  # as a kill would, in the middle of the write

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}, "global_step": 2}, tmp_path / "last.ckpt")
    monkeypatch.undo()
    assert io.load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 1
    io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}, "global_step": 3}, tmp_path / "last.ckpt")
    assert os.listdir(tmp_path) == ["last.ckpt"]  # the next save removes what killed saves left beside it
    assert io.load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 3


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
