import argparse
import os
from pathlib import Path

import pytest
import torch
from conftest import assert_same_tree, fit, toy_module
from lightning import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dmd_lightning.checkpoint import CheckpointIO, ModelCheckpoint, ShardedCheckpointIO, find_last_checkpoint
from dmd_lightning.cli import cli
from dmd_lightning.errors import CheckpointError

KIB4 = 4096


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
    assert_same_tree(saved["state_dict"], model.state_dict())
    assert_same_tree(saved["optimizer_states"][0], trainer.optimizers[0].state_dict())

    resumed, resumed_model = fit_linear(tmp_path / "a", max_steps=10, ckpt_path=ckpt / "last.ckpt")
    _, straight = fit_linear(tmp_path / "b", max_steps=10)
    assert resumed.global_step == 10
    assert_same_tree(resumed_model.state_dict(), straight.state_dict())

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
