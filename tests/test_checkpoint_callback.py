import torch
from conftest import fit, toy_module

from dmd_lightning.checkpoint import ModelCheckpoint


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
