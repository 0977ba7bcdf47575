"""Stored noise-image regression pairs (DMD Sec. 3.3): the on-disk layout and the dataset that reads it.

A pair folder holds `manifest.json` (layout and the sampler settings that made the pairs) and shards
`shard-00000.safetensors`, ... each with tensors `index` (n,), `noise` (n, *noise_shape), `x` (n, *noise_shape)
and, for class-conditional teachers, `cond` (n,); the sampler settings are repeated in each shard's metadata.
Files are written to a temporary name in the same folder and renamed, so a shard either exists whole or not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import Dataset

MANIFEST = "manifest.json"


class PairsError(ValueError):
    """A pair folder is missing, incomplete, corrupted, or was made with other settings than expected."""


def shard_name(s: int) -> str:
    return f"shard-{s:05d}.safetensors"


def num_shards(num_pairs: int, shard_size: int) -> int:
    return -(-num_pairs // shard_size)


def shard_range(s: int, num_pairs: int, shard_size: int) -> range:
    """The pair indices of shard s (the last shard may be shorter)."""
    return range(s * shard_size, min((s + 1) * shard_size, num_pairs))


def item_noise(seed: int, i: int, shape: list[int]) -> Tensor:
    """N(0, I) noise of pair i, from its own generator seeded by (seed, i): the same on any rank or batching."""
    if not (0 <= seed < 2**31 and 0 <= i < 2**32):
        raise ValueError(f"need 0 <= seed < 2**31 and 0 <= index < 2**32, got seed={seed}, index={i}")
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 2**32 + i))


def item_label(i: int, num_classes: int) -> int:
    """Class label of pair i: cycling through the classes keeps every shard balanced."""
    return i % num_classes


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name next to `path`, then rename: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write_bytes(Path(folder) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise PairsError(f"pair folder {str(folder)!r} does not exist; generate it with `dmd pairs --config ...`")
    if not path.is_file():
        raise PairsError(f"{path} is missing: {str(folder)!r} is not a pair folder (empty, or generation never started)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PairsError(f"{path} is not valid JSON ({err}); delete the folder and regenerate") from None


def write_shard(path: Path, tensors: dict[str, Tensor], settings: dict) -> None:
    """safetensors file with the sampler settings as metadata, written atomically."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"settings": json.dumps(settings)})
    os.replace(tmp, path)


def read_shard(path: Path, indices: range) -> tuple[dict[str, Tensor], dict]:
    """Settings of one shard and its small per-pair tensors (`index`, and `cond`, `prompt_index`, ... if present;
    not the images: see map_shard). PairsError naming the file if it is truncated or holds other indices."""
    try:
        with safe_open(str(path), framework="pt") as f:
            settings = json.loads((f.metadata() or {})["settings"])
            lengths = {k: f.get_slice(k).get_shape()[0] for k in f.keys()}
            small = {k: f.get_tensor(k) for k in f.keys() if k not in IMAGES}
    except FileNotFoundError:
        raise PairsError(f"shard {path} is missing") from None
    except Exception as err:  # safetensors raises its own error types for truncated or garbled files
        raise PairsError(f"shard {path} is truncated or corrupted ({type(err).__name__}: {err}); delete it and "
                         "rerun `dmd pairs` to regenerate it") from None
    expected = torch.arange(indices.start, indices.stop)
    index = small.get("index")
    if index is None or not torch.equal(index, expected) or any(n != len(expected) for n in lengths.values()):
        raise PairsError(f"shard {path} does not hold pairs {indices.start}..{indices.stop - 1} with matching sizes; "
                         "delete it and rerun `dmd pairs`")
    return small, settings


# the per-pair tensors that hold images (or latents): memory-mapped, never loaded whole
IMAGES = ("noise", "x")
_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.int16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def map_shard(path: Path, names: tuple[str, ...] = IMAGES) -> dict[str, tuple[np.memmap, str]]:
    """Read-only memory maps of a safetensors file's tensors `names`, with their safetensors dtypes: reading a
    row touches only its pages, and the OS page cache shares them between the ranks of a machine."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    out = {}
    for name in names:
        info = header[name]
        begin, _ = info["data_offsets"]
        out[name] = (np.memmap(path, dtype=_NUMPY[info["dtype"]], mode="r", offset=8 + size + begin,
                               shape=tuple(info["shape"])), info["dtype"])
    return out


class MappedRows:
    """One per-pair tensor spread over shard files, memory-mapped. Indexing by an int, a slice or an index
    tensor gathers those rows into a new tensor; `shape` and `dtype` are the whole tensor's."""

    def __init__(self, parts: list[np.memmap], safetensors_dtype: str):
        self.parts, self.bf16 = parts, safetensors_dtype == "BF16"
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = torch.Size([int(self.starts[-1]), *parts[0].shape[1:]])
        self.dtype = torch.bfloat16 if self.bf16 else torch.from_numpy(np.empty(0, parts[0].dtype)).dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> Tensor:
        single = isinstance(idx, int)
        if isinstance(idx, slice):
            rows = np.arange(*idx.indices(len(self)))
        else:  # an int or an index tensor, without building an index of every pair
            rows = np.atleast_1d(torch.as_tensor(idx).numpy())
        rows = np.where(rows < 0, rows + len(self), rows)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"pair index out of range for {len(self)} pairs")
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.parts[0].dtype)
        for s in np.unique(shard):
            take = shard == s
            out[take] = self.parts[s][rows[take] - self.starts[s]]
        t = torch.from_numpy(out)
        t = t.view(torch.bfloat16) if self.bf16 else t
        return t[0] if single else t


def shard_is_complete(path: Path, indices: range) -> bool:
    """A finished shard: its file exists and loads with the expected indices."""
    if not path.is_file():
        return False
    try:
        read_shard(path, indices)
    except PairsError:
        return False
    return True


def check_expected(manifest: dict, expect: dict | None, where: Path) -> None:
    """PairsError naming both values when a manifest setting differs from the expected one."""
    for key, want in (expect or {}).items():
        have = manifest.get(key, "<absent>")
        if have != want:
            raise PairsError(f"{where}: pairs were made with {key}={have!r}, but {key}={want!r} was expected; "
                             "regenerate them into another folder or change the config")


class PairDataset(Dataset):
    """The pairs of a folder: items {"pair_z", "pair_x", "pair_cond"}, and the columns `noise`, `x` (MappedRows:
    memory-mapped, so a rank holds only the rows it reads; `pairs.x[idx]` gathers a batch), `cond` and `index`
    (tensors, in memory). `columns` holds every small per-pair tensor of the shards (index, cond, ...).

    `expect` maps manifest keys (teacher, sampler, num_steps, guidance_scale, noise_shape, ...) to the values
    the caller requires. Rows keep their storage dtype (float32 or float16).
    """

    def __init__(self, folder: str | Path, expect: dict | None = None):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        check_expected(self.manifest, expect, self.folder / MANIFEST)
        n, size, total = self.manifest["num_pairs"], self.manifest["shard_size"], self.manifest["num_shards"]
        paths = [self.folder / shard_name(s) for s in range(total)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise PairsError(f"pair set {self.folder} is incomplete: {total - len(missing)} of {total} shards present; "
                             f"missing {missing[0].name}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                             + "; rerun `dmd pairs` to finish it")
        small, maps = [], []
        for s, path in enumerate(paths):
            tensors, settings = read_shard(path, shard_range(s, n, size))
            check_expected(settings, {k: self.manifest.get(k) for k in settings}, path)
            small.append(tensors)
            maps.append(map_shard(path))
        self.columns = {k: torch.cat([p[k] for p in small]) for k in small[0]}
        self.index, self.cond = self.columns["index"], self.columns.get("cond")
        self.noise, self.x = (MappedRows([m[k][0] for m in maps], maps[0][k][1]) for k in IMAGES)

    def __len__(self) -> int:
        return len(self.noise)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item = {"pair_z": self.noise[i], "pair_x": self.x[i]}
        if self.cond is not None:
            item["pair_cond"] = self.cond[i]
        return item
