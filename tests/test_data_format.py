"""The shard format's reader: memory-mapped rows gathered across shard files, checksums that catch every flipped
byte, non-finite pairs and broken manifests refused, settings compared as the command line gives them."""

import hashlib
import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dmd_lightning.data import format as pair_data
from dmd_lightning.data.format import (
    MANIFEST,
    MappedRows,
    PairDataset,
    PairsError,
    check_expected,
    map_shard,
    read_shard,
    shard_name,
    write_manifest,
    write_shard,
)


def shards(tmp_path, dtype, sizes=(4, 3, 5)):
    """Shard files of consecutive rows; returns their paths and the whole tensor."""
    whole = torch.randn(sum(sizes), 2, 3).to(dtype)
    paths, start = [], 0
    for s, n in enumerate(sizes):
        path = tmp_path / f"s{s}.safetensors"
        save_file({"index": torch.arange(start, start + n), "x": whole[start:start + n].contiguous()}, str(path))
        paths.append(path)
        start += n
    return paths, whole


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rows_gather_across_shards_as_a_whole_tensor_would(tmp_path, dtype):
    paths, whole = shards(tmp_path, dtype)
    maps = [map_shard(p, ("x",))["x"] for p in paths]
    rows = MappedRows([m for m, _ in maps], maps[0][1])
    assert rows.shape == whole.shape and rows.dtype == dtype and len(rows) == 12
    idx = torch.tensor([11, 0, 4, 3, 7, 4, 8])  # every shard, unordered, a repeat, both edges of a shard
    assert torch.equal(rows[idx], whole[idx])
    assert torch.equal(rows[:], whole) and torch.equal(rows[2:9], whole[2:9]) and torch.equal(rows[::5], whole[::5])
    assert torch.equal(rows[5], whole[5]) and torch.equal(rows[-1], whole[-1])
    with pytest.raises(IndexError, match="out of range for 12 pairs"):
        rows[torch.tensor([3, 12])]


def test_rows_are_maps_of_the_file_not_copies(tmp_path):
    paths, _ = shards(tmp_path, torch.float32)
    mapped, dtype = map_shard(paths[1], ("x",))["x"]
    assert isinstance(mapped, np.memmap) and dtype == "F32" and not mapped.flags.writeable
    assert torch.equal(torch.from_numpy(np.array(mapped)), load_file(str(paths[1]))["x"])


def pair_folder(folder, dtype=torch.float32, n=12, shard_size=5, poison=None):
    """A pair folder of n pairs (noise_shape [1, 2, 2]) written with write_shard; `poison` maps (tensor name,
    pair index) to a value put in that pair."""
    noise, x = torch.randn(n, 1, 2, 2).to(dtype), torch.randn(n, 1, 2, 2).to(dtype)
    for (name, i), value in (poison or {}).items():
        {"noise": noise, "x": x}[name][i, 0, 1, 0] = value
    folder.mkdir(exist_ok=True)
    for s, start in enumerate(range(0, n, shard_size)):
        rows = slice(start, min(start + shard_size, n))
        write_shard(folder / shard_name(s), {"index": torch.arange(n)[rows], "noise": noise[rows], "x": x[rows]},
                    {"teacher": "t"})
    write_manifest(folder, {"num_pairs": n, "shard_size": shard_size, "num_shards": -(-n // shard_size),
                            "noise_shape": [1, 2, 2], "teacher": "t"})
    return noise, x


def test_checksums_are_the_sha256_of_each_tensors_raw_bytes(tmp_path):
    tensors = {"index": torch.arange(3), "noise": torch.randn(3, 2), "x": torch.randn(3, 2).to(torch.bfloat16)}
    write_shard(tmp_path / "s.safetensors", tensors, {"teacher": "t"})
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as f:
        meta = f.metadata()
    raw = {k: hashlib.sha256(v.view(torch.uint8).numpy()).hexdigest() for k, v in tensors.items()}
    assert json.loads(meta["sha256"]) == raw and json.loads(meta["settings"]) == {"teacher": "t"}
    assert meta["settings_sha256"] == hashlib.sha256(meta["settings"].encode()).hexdigest()


def test_every_flipped_byte_of_a_shard_is_a_pairs_error(tmp_path):
    path = tmp_path / "s.safetensors"
    write_shard(path, {"index": torch.arange(3), "noise": torch.randn(3, 2), "x": torch.randn(3, 2).half(),
                       "cond": torch.arange(3)}, {"teacher": "t"})
    good = path.read_bytes()
    data_start = 8 + int.from_bytes(good[:8], "little")
    read_shard(path, range(3))
    for i in range(len(good)):
        for mask in (0x01, 0xFF):  # one bit, every bit
            path.write_bytes(good[:i] + bytes([good[i] ^ mask]) + good[i + 1:])
            with pytest.raises(PairsError, match="s.safetensors: .*rerun `dmd pairs`") as err:
                read_shard(path, range(3))
            assert i < data_start or re.search(r"checksum mismatch in '(index|noise|x|cond)'", str(err.value))


def test_a_shard_without_checksums_is_refused_with_what_to_do(tmp_path):
    pair_folder(tmp_path)
    old = load_file(str(tmp_path / shard_name(1)))  # as written before checksums existed
    save_file(old, str(tmp_path / shard_name(1)), metadata={"settings": json.dumps({"teacher": "t"})})
    with pytest.raises(PairsError, match=re.escape(f"{tmp_path / shard_name(1)}: no checksums (written by an older "
                                                   "version of dmd_lightning); rerun `dmd pairs`")):
        PairDataset(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nan_or_inf_pairs_are_refused_naming_the_shard_and_first_pair(tmp_path, dtype, monkeypatch):
    monkeypatch.setattr(pair_data, "CHUNK", 40)  # scan a few rows at a time, as a big shard would be
    pair_folder(tmp_path, dtype, poison={("x", 8): float("nan"), ("noise", 7): float("-inf"), ("x", 11): 1.0})
    with pytest.raises(PairsError, match=rf"{shard_name(1)}: pair 7 holds NaN or inf in 'noise'"):
        PairDataset(tmp_path)
    pair_folder(tmp_path, dtype, poison={("x", 11): float("inf")})
    with pytest.raises(PairsError, match=rf"{shard_name(2)}: pair 11 holds NaN or inf in 'x'"):
        PairDataset(tmp_path)
    pair_folder(tmp_path, dtype, poison={("x", 3): -3e38 if dtype != torch.float16 else -6e4})  # finite extremes
    assert len(PairDataset(tmp_path)) == 12


def test_a_manifest_without_a_required_key_names_it(tmp_path):
    pair_folder(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    del manifest["shard_size"]
    write_manifest(tmp_path, manifest)
    with pytest.raises(PairsError, match=re.escape(f"{tmp_path / MANIFEST} has no key 'shard_size'")):
        PairDataset(tmp_path)


def test_expected_values_given_as_strings_or_other_spellings_of_a_path_match(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifest = {"num_steps": 5, "guidance_scale": 1.0, "noise_shape": [1, 2, 2], "teacher": "weights/x"}
    check_expected(manifest, {"num_steps": "5", "guidance_scale": "1.0", "noise_shape": "[1, 2, 2]"}, tmp_path)
    check_expected(manifest, {"guidance_scale": 1, "teacher": "./weights/x", "noise_shape": (1, 2, 2)}, tmp_path)
    check_expected(manifest, {"teacher": str(tmp_path / "weights" / "y" / ".." / "x")}, tmp_path)
    with pytest.raises(PairsError, match=re.escape("num_steps=5, but num_steps='6' was expected")):
        check_expected(manifest, {"num_steps": "6"}, tmp_path)
    with pytest.raises(PairsError, match=re.escape("num_steps='5', but num_steps=6 was expected")):
        check_expected({"num_steps": "5"}, {"num_steps": 6}, tmp_path)
    with pytest.raises(PairsError, match=re.escape("teacher='weights/x', but teacher='weights/y' was expected")):
        check_expected(manifest, {"teacher": "weights/y"}, tmp_path)
    with pytest.raises(PairsError, match="noise_shape"):
        check_expected(manifest, {"noise_shape": (1, 2, 3)}, tmp_path)


def test_shards_and_manifest_get_the_usual_file_mode(tmp_path):
    old = os.umask(0o027)
    try:
        pair_folder(tmp_path)
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {oct(0o640)}


def test_shards_and_manifest_reach_the_disk_before_their_rename_and_the_rename_after(tmp_path, monkeypatch):
    """A power loss after a write leaves the old file or the whole new one, never an empty manifest."""
    from dmd_lightning.data.format import write_manifest

    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.path.basename(os.readlink(
        f"/proc/self/fd/{fd}")))) or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", os.path.basename(b))) or replace(a, b))
    write_manifest(tmp_path, {"num_pairs": 1})
    assert events == [("fsync", ".manifest.json.tmp-%d" % os.getpid()), ("rename", "manifest.json"),
                      ("fsync", tmp_path.name)]
