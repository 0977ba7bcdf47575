import pytest
import torch
from conftest import fit, toy_module
from lightning import Callback

from dmd_lightning.checkpoint import ModelCheckpoint
from dmd_lightning.errors import ConfigError


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


def test_ranks_agree_on_a_signal_every_log_every_n_steps_batches_and_save_at_an_update_boundary(tmp_path):
    """Under DDP the agreement is a collective that waits for the device: it runs at batches 0, 5, 10, ... only (here
    log_every_n_steps 5); once agreed, last.ckpt waits for the end of the accumulated update without asking again."""
    import signal
    from types import SimpleNamespace

    asked, saved = [], []
    module = SimpleNamespace(mid_update=True)
    strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all: asked.append(batch) or decision)
    trainer = SimpleNamespace(world_size=2, log_every_n_steps=5, strategy=strategy, lightning_module=module,
                              global_step=3, save_checkpoint=saved.append)
    callback = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    callback.signum = signal.SIGTERM  # this rank received it
    for batch in range(1, 7):
        module.mid_update = batch < 6
        callback._save_if_signalled(trainer, batch)
    assert asked == [5] and saved == [str(tmp_path / "last.ckpt")] and callback._stopping is not None


class RecordSaves(Callback):
    def __init__(self):
        self.saves = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.saves.append((trainer.global_step, pl_module.mid_update))


def test_an_accumulating_run_resumed_at_a_periodic_save_does_not_save_again_inside_its_first_update(tmp_path):
    """Lightning forgets the step of its last save across a resume; the first micro-batch, at the checkpoint's
    global step, would save again with half an update's gradients missing."""
    ckpt = dict(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4)
    fit(toy_module(optim={"accumulate": 2}), max_steps=4, tmp_path=tmp_path, callbacks=[ModelCheckpoint(**ckpt)])
    saves = RecordSaves()
    fit(toy_module(optim={"accumulate": 2}), max_steps=6, tmp_path=tmp_path, ckpt_path=str(tmp_path / "ckpt/last.ckpt"),
        callbacks=[ModelCheckpoint(**ckpt), saves])
    assert saves.saves == [(6, False)]


def test_accumulating_runs_validate_at_update_boundaries_and_never_save_inside_an_update(tmp_path):
    with pytest.raises(ConfigError, match="multiple of 2"):
        fit(toy_module(optim={"accumulate": 2}), max_steps=4, tmp_path=tmp_path, limit_val_batches=1,
            val_check_interval=3, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    saves = RecordSaves()
    with pytest.warns(UserWarning, match="epoch ended inside an accumulated update"):  # epochs of 3 batches
        fit(toy_module(optim={"accumulate": 2}), max_steps=100, max_epochs=1, limit_train_batches=3,
            tmp_path=tmp_path, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True), saves])
    assert saves.saves == []
