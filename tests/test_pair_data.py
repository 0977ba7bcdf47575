"""The shard format's reader: memory-mapped rows gathered across shard files."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dmd_lightning.pair_data import MappedRows, map_shard


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
