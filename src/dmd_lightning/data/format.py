"""Stored noise-image regression pairs (DMD Sec. 3.3): the on-disk layout and the dataset that reads it.

A pair folder holds `manifest.json` (layout and the sampler settings that made the pairs) and shards
`shard-00000.safetensors`, ... each with tensors `index` (n,), `noise` (n, *noise_shape), `x` (n, *noise_shape)
and, for class-conditional teachers, `cond` (n,); the sampler settings are repeated in each shard's metadata.
Files are written to a temporary name in the same folder and renamed, so a shard either exists whole or not.

Each shard's metadata also holds checksums: `sha256`, JSON {tensor name: SHA-256 of its raw bytes}, and
`settings_sha256`, the SHA-256 of the `settings` string. PairDataset verifies them once when it opens a folder
and `dmd pairs` before it skips a finished shard, so a flipped bit anywhere in a shard is an error (PairDataset)
or a shard to regenerate (`dmd pairs`), never silently different pairs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor
from torch.utils.data import Dataset

from dmd_lightning.checkpoint.files import fsync

MANIFEST = "manifest.json"
MANIFEST_KEYS = ("num_pairs", "shard_size", "num_shards", "noise_shape")  # what every reader needs
CHUNK = 1 << 24  # bytes of pairs scanned at once for NaN / inf


class PairsError(ValueError):
    """A pair folder is missing, incomplete, corrupted, or was made with other settings than expected."""


class ShardError(PairsError):
    """One shard file is missing, truncated, corrupted, without checksums or holds other pairs: `dmd pairs`
    regenerates it. `why` is the reason alone, without the file and the advice."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"shard {path}: {why}; rerun `dmd pairs` with the same config to regenerate it")
        self.path, self.why = path, why


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
    """Write to a temporary name next to `path`, flush it to disk, then rename (and flush the folder): readers,
    also after a power loss, see the old file or the new one. The file gets the usual mode, 0o666 minus the umask.
    The name ends in `.tmp-<pid>`: see writer_is_gone."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    fsync(tmp)
    os.replace(tmp, path)
    fsync(path.parent)


def writer_is_gone(tmp: Path) -> bool:
    """Whether the process that named the temporary file `tmp` (`....tmp-<pid>`) can no longer be writing it: it
    is this process (which writes one file at a time, never across calls) or no process on this machine."""
    pid = tmp.name.rpartition(".tmp-")[2]
    if not pid.isdigit() or int(pid) == 0:  # not our name; pid 0 would signal our own process group
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)  # signal 0: only checks that the process exists
    except (ProcessLookupError, OverflowError):
        return True
    except PermissionError:  # alive, owned by another user
        pass
    return False


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write_bytes(Path(folder) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a pair folder; PairsError naming the file if it is absent, garbled or lacks a key that
    readers need (MANIFEST_KEYS)."""
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise PairsError(f"pair folder {str(folder)!r} does not exist; generate it with `dmd pairs --config ...`")
    if not path.is_file():
        raise PairsError(f"{path} is missing: {str(folder)!r} is not a pair folder (empty, or generation never started)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PairsError(f"{path} is not valid JSON ({err}); delete the folder and regenerate") from None
    missing = [k for k in MANIFEST_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise PairsError(f"{path} has no key {', '.join(map(repr, missing))}: it was not written by `dmd pairs` or "
                         "was edited; delete the folder and regenerate")
    return manifest


def digest(data: Tensor | np.ndarray) -> str:
    """SHA-256 of a tensor's raw bytes as safetensors stores them, or of a memory map's bytes (read in place)."""
    if isinstance(data, Tensor):
        data = data.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()


def write_shard(path: Path, tensors: dict[str, Tensor], settings: dict) -> None:
    """safetensors file with the sampler settings and the checksums as metadata, written atomically."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    text = json.dumps(settings)
    metadata = {"settings": text, "settings_sha256": hashlib.sha256(text.encode()).hexdigest(),
                "sha256": json.dumps({k: digest(v) for k, v in tensors.items()})}
    # bytes and atomic_write_bytes, not save_file: that one creates files readable by their owner only
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def checksum_problem(path: Path, metadata: dict, small: dict[str, Tensor]) -> str | None:
    """What differs from the shard's checksums (None if nothing): the settings, then each tensor's bytes, the
    small ones from memory, the images hashed straight from the memory-mapped file."""
    if "sha256" not in metadata or "settings_sha256" not in metadata:
        return "no checksums (written by an older version of dmd_lightning)"
    if hashlib.sha256(metadata["settings"].encode()).hexdigest() != metadata["settings_sha256"]:
        return "checksum mismatch in the settings metadata"
    want = json.loads(metadata["sha256"])
    images = map_shard(path, tuple(k for k in IMAGES if k in want))
    have = {**{k: digest(v) for k, v in small.items()}, **{k: digest(m) for k, (m, _) in images.items()}}
    if set(have) != set(want):
        return f"checksums for tensors {sorted(want)} but the file holds {sorted(have)}"
    bad = [k for k in sorted(want) if have[k] != want[k]]
    return f"checksum mismatch in {bad[0]!r}" if bad else None


def read_shard(path: Path, indices: range, images: tuple[str, ...] | None = None) -> tuple[dict[str, Tensor], dict]:
    """Settings of one shard and its small per-pair tensors (`index`, and `cond`, `prompt_index`, ... if present;
    not the images: see map_shard), after verifying every checksum. ShardError naming the file if it is missing,
    truncated, corrupted, has no checksums, or holds other indices. `images`: the image tensors it must hold
    (default IMAGES; a cache of real latents has `x` only)."""
    images = IMAGES if images is None else images
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            lengths = {k: f.get_slice(k).get_shape()[0] for k in f.keys()}
            small = {k: f.get_tensor(k) for k in f.keys() if k not in images}
        problem = checksum_problem(path, metadata, small)
        settings = json.loads(metadata["settings"])
    except FileNotFoundError:
        raise ShardError(path, "missing") from None
    except Exception as err:  # safetensors raises its own error types for truncated or garbled files
        raise ShardError(path, f"truncated or corrupted ({type(err).__name__}: {err})") from None
    if problem:
        raise ShardError(path, problem)
    expected = torch.arange(indices.start, indices.stop)
    index = small.get("index")
    if (index is None or index.dtype != expected.dtype or not torch.equal(index, expected)
            or any(k not in lengths for k in images)
            or any(n != len(expected) for n in lengths.values())):
        raise ShardError(path, f"does not hold pairs {indices.start}..{indices.stop - 1} (index, noise, x, ... of "
                               f"{len(expected)} rows each)")
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


def first_nonfinite_row(rows: np.ndarray, bf16: bool) -> int | None:
    """Index of the first row holding NaN or inf (None if none), scanning CHUNK bytes at a time so that memory
    stays bounded. bf16 rows arrive as int16 (numpy has no bfloat16): NaN and inf have all 8 exponent bits set."""
    step = max(1, CHUNK // max(1, rows[:1].nbytes))
    for start in range(0, len(rows), step):
        chunk = np.asarray(rows[start:start + step]).reshape(min(step, len(rows) - start), -1)
        bad = (chunk.view(np.uint16) & 0x7F80) == 0x7F80 if bf16 else ~np.isfinite(chunk)
        hits = np.flatnonzero(bad.any(axis=1))
        if hits.size:
            return start + int(hits[0])
    return None


def check_finite(path: Path, maps: dict[str, tuple[np.memmap, str]], start: int) -> None:
    """PairsError naming the shard and the first pair (global index) with NaN or inf: one such pair would make
    the regression loss, and then the generator, NaN."""
    bad = {k: first_nonfinite_row(m, dtype == "BF16") for k, (m, dtype) in maps.items()}
    bad = {k: i for k, i in bad.items() if i is not None}
    if bad:
        name = min(bad, key=bad.get)
        raise PairsError(f"shard {path}: pair {start + bad[name]} holds NaN or inf in {name!r} (the teacher's "
                         "sampler diverged, or its values overflow the storage dtype); fix the teacher or sampler "
                         "settings, or use dtype float32, and regenerate the pairs into a new folder")


def shard_problem(path: Path, indices: range) -> str | None:
    """Why the shard at `path` must be (re)generated: None for a finished shard (its file exists, its checksums
    hold and it has the expected indices), else "missing" or what is wrong with it."""
    try:
        read_shard(path, indices)
    except ShardError as err:
        return err.why
    return None


def parsed(value):
    """A value given on the command line may arrive as a string: '5' -> 5, '1.0' -> 1.0, '[1, 32]' -> [1, 32]."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def same_setting(key: str, have, want) -> bool:
    """Whether a manifest value `have` is the expected `want`: a string and a number (or list) compare by what the
    string means, and teacher paths by the file they name (./weights/x is weights/x, or its absolute path)."""
    if key == "teacher" and all(isinstance(v, (str, os.PathLike)) for v in (have, want)):
        have, want = os.fspath(have), os.fspath(want)
        return (os.path.normpath(have) == os.path.normpath(want)
                or Path(have).expanduser().resolve() == Path(want).expanduser().resolve())
    if isinstance(have, str) != isinstance(want, str):
        return parsed(have) == parsed(want)
    if isinstance(have, (list, tuple)) and isinstance(want, (list, tuple)):  # JSON lists, Python tuples
        return list(have) == list(want)
    return have == want


def check_expected(manifest: dict, expect: dict | None, where: Path) -> None:
    """PairsError naming both values when a manifest setting differs from the expected one (see same_setting)."""
    for key, want in (expect or {}).items():
        have = manifest.get(key, "<absent>")
        if not same_setting(key, have, want):
            raise PairsError(f"{where}: pairs were made with {key}={have!r}, but {key}={want!r} was expected; "
                             "regenerate them into another folder or change the config")


class PairDataset(Dataset):
    """The pairs of a folder: items {"pair_z", "pair_x", "pair_cond"}, and the columns `noise`, `x` (MappedRows:
    memory-mapped, so a rank holds only the rows it reads; `pairs.x[idx]` gathers a batch), `cond` and `index`
    (tensors, in memory). `columns` holds every small per-pair tensor of the shards (index, cond, ...).

    `expect` maps manifest keys (teacher, sampler, num_steps, guidance_scale, noise_shape, ...) to the values
    the caller requires. Rows keep their storage dtype (float32, float16 or bfloat16). Opening verifies every
    shard's checksums and refuses NaN/inf pairs: one pass over the files (about 60 ms for 10,000 1x32x32 float32
    pairs in the page cache), once per run and rank.
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
            indices = shard_range(s, n, size)
            tensors, settings = read_shard(path, indices)  # verifies the checksums: once per run, here
            check_expected(settings, {k: self.manifest.get(k) for k in settings}, path)
            small.append(tensors)
            maps.append(map_shard(path))
            check_finite(path, maps[-1], indices.start)
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
