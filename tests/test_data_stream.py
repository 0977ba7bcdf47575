import pytest
import torch

from dmd_lightning.data.format import PairsError, write_manifest, write_shard
from dmd_lightning.data.stream import DMDDataModule


def make_pairs(folder, n=40, num_classes=4, teacher="t"):
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"teacher": teacher, "sampler": "ddim", "num_steps": 5, "guidance_scale": 1.0}
    tensors = {"index": torch.arange(n), "noise": torch.randn(n, 1, 8, 8), "x": torch.rand(n, 1, 8, 8),
               "cond": torch.tensor([0] * (n // 2) + [1, 2, 3] * (n // 6) + [3] * (n - n // 2 - 3 * (n // 6)))}
    write_shard(folder / "shard-00000.safetensors", tensors, settings)
    write_manifest(folder, {"num_pairs": n, "shard_size": n, "num_shards": 1, "noise_shape": [1, 8, 8],
                            "num_classes": num_classes, "seed": 0, "dtype": "float32", **settings})
    return tensors


def test_batches_hold_a_dm_batch_and_a_regression_batch_of_separate_sizes(tmp_path):
    pairs = make_pairs(tmp_path / "p")
    dm = DMDDataModule(str(tmp_path / "p"), batch_size=6, pair_batch_size=3, num_classes=4, val_size=10,
                       val_batch_size=4, expect={"sampler": "ddim"})
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["z"].shape == (6, 1, 8, 8) and batch["cond"].shape == (6,)
    assert batch["pair_z"].shape == (3, 1, 8, 8) and batch["pair_x"].shape == (3, 1, 8, 8)
    # every regression item is a stored pair, with its own condition
    for z, x, c in zip(batch["pair_z"], batch["pair_x"], batch["pair_cond"]):
        i = int((pairs["noise"] - z).flatten(1).abs().sum(1).argmin())
        assert torch.equal(pairs["x"][i], x) and pairs["cond"][i] == c
    val = list(dm.val_dataloader())
    assert [len(b["z"]) for b in val] == [4, 4, 2] and val[0]["cond"].tolist() == [0, 1, 2, 3]


def test_dm_conditions_follow_the_label_frequencies_of_the_pairs(tmp_path):
    make_pairs(tmp_path / "p", n=600)
    dm = DMDDataModule(str(tmp_path / "p"), batch_size=4000, pair_batch_size=1, num_classes=4)
    dm.setup("fit")
    freq = torch.bincount(next(iter(dm.train_dataloader()))["cond"], minlength=4).float() / 4000
    torch.testing.assert_close(freq, dm.label_probs(), atol=0.03, rtol=0)
    assert abs(float(dm.label_probs()[0]) - 0.5) < 0.01


def test_stream_resumes_at_its_position(tmp_path):
    make_pairs(tmp_path / "p")
    dm = DMDDataModule(str(tmp_path / "p"), batch_size=2, pair_batch_size=2, num_classes=4)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    batches = [next(it) for _ in range(5)]
    dm2 = DMDDataModule(str(tmp_path / "p"), batch_size=2, pair_batch_size=2, num_classes=4)
    dm2.setup("fit")
    dm2.load_state_dict({"position": 3})
    resumed = next(iter(dm2.train_dataloader()))
    torch.testing.assert_close(resumed["z"], batches[3]["z"])


def test_a_resume_with_another_global_batch_or_seed_warns_and_the_same_global_batch_on_two_devices_does_not(
        tmp_path, recwarn):
    from types import SimpleNamespace

    make_pairs(tmp_path / "p")
    saved = DMDDataModule(str(tmp_path / "p"), batch_size=4, pair_batch_size=2).state_dict()
    two = DMDDataModule(str(tmp_path / "p"), batch_size=2, pair_batch_size=1)
    two.trainer = SimpleNamespace(global_rank=1, world_size=2, lightning_module=None)
    two.load_state_dict(saved)  # 1 x 4 -> 2 x 2: the same global batches
    assert not recwarn.list
    for changed, warning in (({"batch_size": 8}, "batch_size 4 -> 8"), ({"seed": 3}, "seed 0 -> 3")):
        dm = DMDDataModule(str(tmp_path / "p"), **{"batch_size": 4, "pair_batch_size": 2, **changed})
        with pytest.warns(UserWarning, match=warning):
            dm.load_state_dict(saved)


def test_pairs_of_another_teacher_are_refused(tmp_path):
    make_pairs(tmp_path / "p", teacher="other/teacher")
    dm = DMDDataModule(str(tmp_path / "p"), num_classes=4, expect={"teacher": "weights/fmnist-teacher"})
    try:
        dm.setup("fit")
    except PairsError as err:
        assert "other/teacher" in str(err) and "weights/fmnist-teacher" in str(err)
    else:
        raise AssertionError("mismatched pairs were accepted")


def test_validation_noise_is_no_training_batch_nor_pair_noise():
    """The noise of the validation and report seeds (1 and 2, as the configs) comes from its own stream: none of its
    samples is the DM noise of a training batch (data seed 0) nor a pair's noise (pair seed 0)."""
    from conftest import RandomImages

    from dmd_lightning.data.format import item_noise

    def data(val_seed):
        return DMDDataModule(None, batch_size=16, val_size=16, val_batch_size=16, val_seed=val_seed,
                             real_images=RandomImages())

    batches = iter(data(1).train_dataloader())
    seen = [next(batches)["z"] for _ in range(4)] + [torch.stack([item_noise(0, i, [1, 16, 16]) for i in range(64)])]
    seen = torch.cat(seen).flatten(1)
    for val_seed in (1, 2):
        z = data(val_seed).val_batches()[0]["z"].flatten(1)
        assert torch.cdist(z, seen).min() > 1.0, val_seed
