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

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
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
    """Tensors and settings of one shard; PairsError naming the file if it is truncated or holds other indices."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            settings = json.loads((f.metadata() or {})["settings"])
    except FileNotFoundError:
        raise PairsError(f"shard {path} is missing") from None
    except Exception as err:  # safetensors raises its own error types for truncated or garbled files
        raise PairsError(f"shard {path} is truncated or corrupted ({type(err).__name__}: {err}); delete it and "
                         "rerun `dmd pairs` to regenerate it") from None
    expected = torch.arange(indices.start, indices.stop)
    index = tensors.get("index")
    if index is None or not torch.equal(index, expected) or any(len(t) != len(expected) for t in tensors.values()):
        raise PairsError(f"shard {path} does not hold pairs {indices.start}..{indices.stop - 1} with matching sizes; "
                         "delete it and rerun `dmd pairs`")
    return tensors, settings


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
    """All pairs of a folder in memory: items {"pair_z", "pair_x", "pair_cond"} and whole tensors `noise`, `x`, `cond`.

    `expect` maps manifest keys (teacher, sampler, num_steps, guidance_scale, noise_shape, ...) to the values
    the caller requires. Tensors keep their storage dtype (float32 or float16).
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
        parts = []
        for s, path in enumerate(paths):
            tensors, settings = read_shard(path, shard_range(s, n, size))
            check_expected(settings, {k: self.manifest.get(k) for k in settings}, path)
            parts.append(tensors)
        self.index = torch.cat([p["index"] for p in parts])
        self.noise = torch.cat([p["noise"] for p in parts])
        self.x = torch.cat([p["x"] for p in parts])
        self.cond = torch.cat([p["cond"] for p in parts]) if "cond" in parts[0] else None

    def __len__(self) -> int:
        return len(self.noise)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item = {"pair_z": self.noise[i], "pair_x": self.x[i]}
        if self.cond is not None:
            item["pair_cond"] = self.cond[i]
        return item
