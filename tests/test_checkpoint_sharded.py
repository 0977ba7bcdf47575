"""Checkpoints as folders of small, pickle-free files."""

import argparse
import enum
import json
import os
from collections import OrderedDict

import pytest
import torch
from conftest import assert_same_tree
from lightning.fabric.utilities.data import AttributeDict

from dmd_lightning.checkpoint import ShardedCheckpointIO, load_sharded, save_sharded
from dmd_lightning.errors import CheckpointError

KIB4 = 4096


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
    assert_same_tree(loaded, obj)
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
    assert_same_tree(io.load_checkpoint(tmp_path / "last.ckpt"), obj)
    io.save_checkpoint({"step": 2}, tmp_path / "last.ckpt")  # the next save cleans up
    assert os.listdir(tmp_path) == ["last.ckpt"] and io.load_checkpoint(tmp_path / "last.ckpt") == {"step": 2}
    io.remove_checkpoint(tmp_path / "last.ckpt")
    assert os.listdir(tmp_path) == []
