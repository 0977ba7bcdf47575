"""A checkpoint (a dict of tensors and plain values) as a folder of files of at most `max_shard_bytes` each,
loadable without running pickle code:

    index.json                  the files and their sizes; written last, so a folder without it is incomplete
    skeleton.pt                 everything but the tensors (torch.save, loadable with weights_only=True)
    tensors-00000.safetensors   the tensors, in order, each file at most `max_shard_bytes` (15 MiB)

A tensor too large for the space left in a file is split, as flat contiguous chunks, across files. A folder is
written as `.NAME.tmp-PID` beside its destination, fsynced, then swapped in: an existing `NAME` is renamed to
`.NAME.old`, the new folder to `NAME`, and `.NAME.old` is removed. A crash between the two renames leaves only
`.NAME.old`; loading `NAME` then reads that, and `find_last_checkpoint` offers it to `--ckpt_path last`.
`ShardedCheckpointIO` (io.py) stores the Trainer's checkpoints this way.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors.torch import load_file, save_file

from dmd_lightning.checkpoint.files import existing, remove, swap, write

INDEX, SKELETON, FORMAT = "index.json", "skeleton.pt", "dmd_lightning.sharded/1"
_MARK = "__tensor__"  # a skeleton dict {_MARK: key} stands for a tensor, {_MARK: [keys], "shape": [...]} for chunks
_LEAVES = (str, int, float, bool, type(None), bytes, bytearray, complex, torch.Size)  # exact types pickle-free
_DTYPES = {getattr(torch, n) for n in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16",
                                         "int8", "uint8", "bool", "float8_e4m3fn", "float8_e5m2", "complex64",
                                         "uint16", "uint32", "uint64") if hasattr(torch, n)}  # safetensors' own


def save_sharded(obj: dict, folder, max_shard_bytes: int = 15 * 2**20) -> None:
    """Writes `obj` as the folder `folder` (replacing what is there), crash-safely; see the module docstring."""
    if "://" in str(folder):
        raise ValueError(f"sharded checkpoints are written to local folders only, not {folder}")
    if max_shard_bytes < _MIN_SHARD_BYTES:
        raise ValueError(f"max_shard_bytes={max_shard_bytes}: at least {_MIN_SHARD_BYTES} (one tensor's header)")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    remove(tmp)
    tmp.mkdir()
    try:
        tensors: list = []
        skeleton = _skeleton(obj, "checkpoint", tensors)
        files = {}
        for n, shard in enumerate(_shards(tensors, max_shard_bytes)):
            files[f"tensors-{n:05d}.safetensors"] = write(tmp / f"tensors-{n:05d}.safetensors", save_file, shard)
        files[SKELETON] = write(tmp / SKELETON, torch.save, skeleton)
        if files[SKELETON] > max_shard_bytes:  # key names and loop states: kilobytes, but not split if larger
            warnings.warn(f"{folder.name}/{SKELETON} has {files[SKELETON]} bytes, over {max_shard_bytes=}")
        index = {"format": FORMAT, "max_shard_bytes": max_shard_bytes, "files": files,
                 "total_bytes": sum(files.values())}
        write(tmp / INDEX, lambda text, path: Path(path).write_text(text), json.dumps(index, indent=1))
    except BaseException:
        remove(tmp)
        raise
    swap(tmp, folder)


def load_sharded(folder, map_location: Any | None = None) -> dict:
    """The dict `save_sharded` wrote to `folder` (or, after a crash mid-swap, to its `.old` sibling).

    map_location: a device or device string for the tensors; anything else (Lightning's callables) loads to CPU.
    """
    folder, index = _checked(folder)
    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    tensors = {}
    for name in (n for n in index["files"] if n.endswith(".safetensors")):
        try:
            tensors.update(load_file(folder / name, device=device))
        except safetensors.SafetensorError as err:
            raise ValueError(f"checkpoint shard {folder / name} is corrupt: {err}") from err
    return _fill(_load_skeleton(folder), tensors, folder)


def load_skeleton(folder) -> dict:
    """What `save_sharded` wrote to `folder` without its tensors, each left as None: a cheap look at a checkpoint's
    plain values (its hyper-parameters) that reads kilobytes, not the shards."""
    folder, _ = _checked(folder)
    return _fill(_load_skeleton(folder), None, folder)


def _checked(folder) -> tuple[Path, dict]:
    """The folder to read (see `existing`) and its index, once every file the index lists is there, whole."""
    folder = Path(existing(folder))
    if not (folder / INDEX).is_file():
        raise FileNotFoundError(f"{folder / INDEX} not found: not a (complete) sharded checkpoint")
    try:
        index = json.loads((folder / INDEX).read_text())
    except ValueError as err:
        raise ValueError(f"{folder / INDEX} is corrupt: {err}") from err
    for name, size in index["files"].items():
        if not (folder / name).is_file():
            raise FileNotFoundError(f"checkpoint shard {folder / name} is missing")
        if (folder / name).stat().st_size != size:
            raise ValueError(f"checkpoint shard {folder / name} has {(folder / name).stat().st_size} bytes, "
                             f"{INDEX} says {size}: truncated or corrupt")
    return folder, index


def _load_skeleton(folder: Path):
    try:
        return torch.load(folder / SKELETON, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{folder / SKELETON} is corrupt: {err}") from err


def _skeleton(obj, where: str, tensors: list | None):
    """`obj` with each tensor replaced by a marker dict (appended to `tensors` with the tensor; None where tensors
    cannot be: keys, set items) and hyper-parameter containers (AttributeDict, Namespace) turned into dicts.
    TypeError, naming where, for anything torch.load(weights_only=True) cannot read."""
    if isinstance(obj, torch.Tensor):
        if tensors is None or obj.layout != torch.strided or obj.dtype not in _DTYPES or obj.is_meta:
            raise TypeError(f"{where}: a sharded checkpoint cannot store this {obj.layout} {obj.dtype} tensor "
                            f"on {obj.device}" + (" as a key or set item" if tensors is None else ""))
        marker = {_MARK: None}  # filled in by _shards
        tensors.append((obj, marker))
        return marker
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        if _MARK in obj:
            raise TypeError(f"{where}: the key {_MARK!r} is reserved for the tensor markers of sharded checkpoints")
        out = OrderedDict() if type(obj) is OrderedDict else {}  # AttributeDict and other dict subclasses: dict
        for k, v in obj.items():
            out[_skeleton(k, f"{where} key {k!r}", None)] = _skeleton(v, f"{where}[{k!r}]", tensors)
        if type(obj) is OrderedDict and hasattr(obj, "_metadata"):  # state_dict versions, read by load_state_dict
            out._metadata = _skeleton(obj._metadata, f"{where}._metadata", None)
        return out
    if type(obj) in (list, tuple):
        return type(obj)(_skeleton(v, f"{where}[{i}]", tensors) for i, v in enumerate(obj))
    if type(obj) is set:
        return {_skeleton(v, f"{where} item {v!r}", None) for v in obj}
    if type(obj) in _LEAVES or isinstance(obj, (torch.dtype, torch.device)):
        return obj
    raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be loaded with "
                    "torch.load(weights_only=True); store plain Python values or tensors")


def _shards(tensors: list, max_bytes: int):
    """Yields {key: tensor} dicts whose safetensors files stay within max_bytes, filling in each marker."""
    shard, used, seen = {}, _HEADER_BYTES, set()
    for i, (tensor, marker) in enumerate(tensors):
        t = _own(tensor.detach().to("cpu").contiguous(), seen)
        cost = t.numel() * t.element_size() + _entry_bytes(str(i), t.shape)
        if shard and used + cost > max_bytes and _HEADER_BYTES + cost <= max_bytes:
            yield shard
            shard, used = {}, _HEADER_BYTES
        if used + cost <= max_bytes:
            shard[str(i)], used, marker[_MARK] = t, used + cost, str(i)
            continue
        flat, keys, start, size = t.reshape(-1), [], 0, t.element_size()
        while start < flat.numel():  # too large for the space left: flat chunks, each filling a file
            key = f"{i}.{len(keys)}"
            n = min(flat.numel() - start, (max_bytes - used - _entry_bytes(key, [flat.numel()])) // size)
            if n < 1:
                yield shard
                shard, used = {}, _HEADER_BYTES
                continue
            shard[key] = flat[start:start + n].clone()
            used += n * size + _entry_bytes(key, [n])
            keys.append(key)
            start += n
        marker[_MARK], marker["shape"] = keys, list(t.shape)
    if shard:
        yield shard


_MIN_SHARD_BYTES = 1024
_HEADER_BYTES = 8 + 2 + 8  # a safetensors file: header length, the JSON header's braces, padding to 8 bytes


def _entry_bytes(key: str, shape) -> int:
    """At least the header bytes of one tensor (safetensors writes its JSON compact, without these spaces)."""
    return len(json.dumps({key: {"dtype": "F8_E4M3FNUZ", "shape": list(shape), "data_offsets": [2**53, 2**53]}}))


def _own(t: torch.Tensor, seen: set) -> torch.Tensor:
    """`t`, or a copy where it is a view or shares memory with another: safetensors refuses those."""
    storage = t.untyped_storage()
    if t.numel() and (storage.nbytes() != t.numel() * t.element_size() or storage.data_ptr() in seen):
        t = t.clone()
    seen.add(t.untyped_storage().data_ptr())
    return t


def _fill(node, tensors: dict | None, folder: Path):
    """The inverse of `_skeleton`: markers replaced by the loaded tensors, chunks put back together (by None when
    `tensors` is None)."""
    if isinstance(node, dict) and _MARK in node:
        if tensors is None:
            return None
        keys = node[_MARK]
        missing = [k for k in ([keys] if isinstance(keys, str) else keys) if k not in tensors]
        if missing:
            raise ValueError(f"{folder / SKELETON} names tensors {missing} that no shard in {folder} holds")
        return tensors[keys] if isinstance(keys, str) else torch.cat([tensors[k] for k in keys]).reshape(node["shape"])
    if isinstance(node, dict):
        out = type(node)((k, _fill(v, tensors, folder)) for k, v in node.items())
        if hasattr(node, "_metadata"):
            out._metadata = node._metadata
        return out
    if type(node) in (list, tuple):
        return type(node)(_fill(v, tensors, folder) for v in node)
    return node

