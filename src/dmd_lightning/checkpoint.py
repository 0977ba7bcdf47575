"""Checkpoints for DMD runs: when `last.ckpt` is written, where `--ckpt_path last` finds it, how it is stored.

`ModelCheckpoint` is Lightning's, with `last.ckpt` written when training ends as well. Lightning's own writes
`last.ckpt` only with the periodic saves (`every_n_train_steps`): a run whose max_steps or max_time falls between
two saves ends with a `last.ckpt` that lacks its final steps. DMD's training data is an endless stream, so no
epoch end comes to the rescue.

Lightning also warns, at every periodic save of a manually optimized module, that the checkpoint holds the
state after the optimizer step, and prints a code example of saving a `layer` before it. For DMD that is
the state to keep: weights, optimizer states, EMA and update phase all after the same step, which is where a
resumed run continues. This class leaves that warning out.

It also turns SIGTERM (what a cluster sends before pre-emption) and SIGINT (Ctrl-C) into a resumable stop: the
signal is noted, `last.ckpt` is written at the end of the training step in progress (or, during a validation,
when that validation ends), and `Stopped` is raised, which `dmd` reports in one line with exit code 128 +
the signal's number, so that a scheduler requeues the job. A second Ctrl-C interrupts at once.

`find_last_checkpoint` is what `dmd fit --ckpt_path last` resumes: the newest `last.ckpt` of the run's
checkpoint folder, its logger's `version_*` folders or its `default_root_dir`, not only of the new version's
folder that Lightning looks in.

`CheckpointIO` (the trainer's default in `dmd`) writes single-file checkpoints beside their destination and
renames them into place, so a killed save leaves the previous file whole on any filesystem; it loads with
`weights_only=True` and names the file when it is not a checkpoint.

`ShardedCheckpointIO` (a Trainer plugin; YAML: `trainer: {plugins: [{class_path:
dmd_lightning.checkpoint.ShardedCheckpointIO}]}`) stores each checkpoint as a folder named like the file would
be (`last.ckpt/`), so that a run on a machine that hands back only a few files of at most 16 MiB can be resumed
elsewhere, and so that loading one never runs pickle code:

    index.json                  the files and their sizes; written last, so a folder without it is incomplete
    skeleton.pt                 everything but the tensors (torch.save, loadable with weights_only=True)
    tensors-00000.safetensors   the tensors, in order, each file at most `max_shard_bytes` (15 MiB)

A tensor too large for the space left in a file is split, as flat contiguous chunks, across files. A folder is
written as `.NAME.tmp-PID` beside its destination, fsynced, then swapped in: an existing `NAME` is renamed to
`.NAME.old`, the new folder to `NAME`, and `.NAME.old` is removed. A crash between the two renames leaves only
`.NAME.old`; loading `NAME` then reads that, and `find_last_checkpoint` offers it to `--ckpt_path last`.
`save_sharded` / `load_sharded` are the same storage as plain functions, for code outside the Trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import safetensors
import torch
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors.torch import load_file, save_file

from dmd_lightning.errors import CheckpointError

_POST_STEP_WARNING = "Using ModelCheckpoint with manual optimization and every_n_train_steps"

INDEX, SKELETON, FORMAT = "index.json", "skeleton.pt", "dmd_lightning.sharded/1"
_MARK = "__tensor__"  # a skeleton dict {_MARK: key} stands for a tensor, {_MARK: [keys], "shape": [...]} for chunks
_LEAVES = (str, int, float, bool, type(None), bytes, bytearray, complex, torch.Size)  # exact types pickle-free
_DTYPES = {getattr(torch, n) for n in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16",
                                         "int8", "uint8", "bool", "float8_e4m3fn", "float8_e5m2", "complex64",
                                         "uint16", "uint32", "uint64") if hasattr(torch, n)}  # safetensors' own


class Stopped(Exception):
    """Training stopped on a signal after saving a resumable checkpoint."""

    def __init__(self, signum: int, path: str | None, global_step: int):
        self.signum, self.path, self.global_step = signum, path, global_step
        super().__init__(f"stopped by {signal.Signals(signum).name} at global step {global_step}; "
                         + (f"saved {path}; resume with --ckpt_path last" if path else "nothing saved"))


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's, plus `last.ckpt` at the end of training and a saved stop on SIGTERM / SIGINT (module
    docstring); `stop_on_signal=False` leaves the signals to Lightning."""

    def __init__(self, *args, stop_on_signal: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_on_signal = stop_on_signal
        self.signum: int | None = None  # the signal received
        self._stopping: Stopped | None = None  # raised at the next hook once last.ckpt is saved
        self._handlers: dict = {}
        self._saved_step: int | None = None  # global step of the newest checkpoint this run wrote

    def on_fit_start(self, trainer, pl_module) -> None:
        self.signum, self._stopping, self._saved_step = None, None, None

    def on_train_start(self, trainer, pl_module) -> None:
        # here, after Lightning installs its own SIGTERM handler (which would end the run at once, before an
        # accumulating module reaches its update boundary), so that the signals are this callback's alone
        if self.stop_on_signal and threading.current_thread() is threading.main_thread():
            self._handlers = {s: signal.signal(s, self._notice) for s in (signal.SIGTERM, signal.SIGINT)}

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restore_handlers()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for s, handler in self._handlers.items():
            signal.signal(s, handler)
        self._handlers = {}

    def _notice(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now, unsaved
            self._restore_handlers()
            raise KeyboardInterrupt
        self.signum = signum
        print(f"{signal.Signals(signum).name} received: saving a checkpoint when this step (or validation) ends, "
              "then stopping", file=sys.stderr, flush=True)

    def _save_if_signalled(self, trainer) -> None:
        """Saves last.ckpt if a signal came; `Stopped` is raised at the next hook (after this step's logs)."""
        # every rank must stop at the same step; the signal may have reached only some of them
        if self._stopping is not None or not trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False):
            return
        if getattr(trainer.lightning_module, "mid_update", False):  # gradients of unfinished accumulation: later
            return
        path = self._save_last(trainer)
        self._stopping = Stopped(self.signum or signal.SIGTERM, path, trainer.global_step)

    def _stop_if_saved(self) -> None:
        if self._stopping is not None:
            raise self._stopping

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._stop_if_saved()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._stop_if_saved()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_POST_STEP_WARNING)
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._save_if_signalled(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._save_if_signalled(trainer)
            self._stop_if_saved()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._saved_step = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        # instead of Lightning's, which skips it after any periodic `last` save of this run; saved even at the
        # step of a periodic save, since callbacks' states (the teacher's wall time) change after it
        if self.save_last and not trainer.fast_dev_run:
            trainer.save_checkpoint(self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST))

    def _save_last(self, trainer) -> str:
        """`last.ckpt` at this step, unless a checkpoint of this step is already there."""
        path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)
        if self._saved_step != trainer.global_step or not os.path.lexists(path):
            trainer.save_checkpoint(path)
        return path


_LAST = re.compile(r"^last(-v\d+)?\.ckpt$")


def _lost_lasts(folder) -> list[str]:
    """`.last.ckpt.old` folders in `folder` whose `last.ckpt` a crash mid-swap removed."""
    if not os.path.isdir(folder):
        return []
    olds = [n for n in os.listdir(folder) if n.startswith(".") and n.endswith(".old") and _LAST.match(n[1:-4])]
    return [os.path.join(folder, n) for n in olds if not os.path.lexists(os.path.join(folder, n[1:-4]))]


def find_last_checkpoint(trainer) -> str | None:
    """The newest `last.ckpt` (file or sharded folder) of this run's configuration, None if there is none: in
    the checkpoint callbacks' `dirpath`, else in the folders Lightning would choose, for every version of the
    run's logger (`<save_dir>/<name>/version_*/checkpoints`) or, without a logger, `<default_root_dir>/checkpoints`."""
    roots = [cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    if len(roots) < len(trainer.checkpoint_callbacks) or not roots:
        roots += [logger.root_dir for logger in trainer.loggers if getattr(logger, "root_dir", None)]
        roots += [] if trainer.loggers else [os.path.join(trainer.default_root_dir, "checkpoints")]
    found = set()
    for root in map(str, roots):
        for folder, dirs, _ in os.walk(root):
            dirs[:] = [d for d in dirs if not _LAST.match(d)]  # a sharded checkpoint is a folder: not walked into
            found |= {os.path.join(folder, n) for n in os.listdir(folder) if _LAST.match(n)}
            found |= set(_lost_lasts(folder))
    return max(found, key=os.path.getmtime, default=None)


class CheckpointIO(TorchCheckpointIO):
    """Single-file checkpoints written crash-safely beside their destination, loaded with weights_only=True;
    CheckpointError naming the file when it is missing or not a Lightning checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        try:
            _write(tmp, torch.save, checkpoint)
            os.replace(tmp, path)
        except BaseException:
            _remove(tmp)
            raise
        _fsync(path.parent)
        _remove_stale_temporaries(path)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        if "://" not in str(path) and not os.path.lexists(_existing(path)):
            raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
        if os.path.isdir(_existing(path)):
            raise CheckpointError(f"{path} is a folder, not a checkpoint file (sharded checkpoints need the "
                                  "trainer plugin dmd_lightning.checkpoint.ShardedCheckpointIO)")
        cpu = map_location if map_location is not None else (lambda storage, loc: storage)
        try:
            return super().load_checkpoint(path, map_location=cpu, weights_only=True)
        except Exception as err:
            raise _unreadable(path, err) from None


def _unreadable(path, err: Exception) -> CheckpointError:
    """torch's own message would suggest weights_only=False: unsafe for a stray file."""
    return CheckpointError(f"{path} is not a checkpoint that torch.load(weights_only=True) can read "
                           f"({type(err).__name__}); pass a checkpoint written by `dmd fit`")


def load_checkpoint_file(path) -> dict:
    """A checkpoint file loaded with weights_only=True, memory-mapped where its format allows (a cheap look at
    its hyper-parameters); CheckpointError naming the file when it is not one."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files of the legacy (non-zip) format cannot be memory-mapped
        checkpoint = CheckpointIO().load_checkpoint(path)
    except Exception as err:
        raise _unreadable(path, err) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} is not a checkpoint written by `dmd fit` (it holds a {type(checkpoint).__name__})")
    return checkpoint


class ShardedCheckpointIO(CheckpointIO):
    """Checkpoints as folders of safetensors files of at most `max_shard_bytes` each (see the module docstring).

    Ordinary single-file checkpoints still load, always with weights_only=True.
    """

    def __init__(self, max_shard_bytes: int = 15 * 2**20):
        self.max_shard_bytes = max_shard_bytes

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        save_sharded(checkpoint, path, self.max_shard_bytes)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        if os.path.isdir(_existing(path)):
            try:
                return load_sharded(path, map_location)
            except (OSError, ValueError) as err:
                raise CheckpointError(str(err)) from None
        return super().load_checkpoint(path, map_location, weights_only)

    def remove_checkpoint(self, path) -> None:
        _remove(path)
        _remove(_old(path))


def save_sharded(obj: dict, folder, max_shard_bytes: int = 15 * 2**20) -> None:
    """Writes `obj` as the folder `folder` (replacing what is there), crash-safely; see the module docstring."""
    if "://" in str(folder):
        raise ValueError(f"sharded checkpoints are written to local folders only, not {folder}")
    if max_shard_bytes < _MIN_SHARD_BYTES:
        raise ValueError(f"max_shard_bytes={max_shard_bytes}: at least {_MIN_SHARD_BYTES} (one tensor's header)")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    _remove(tmp)
    tmp.mkdir()
    try:
        tensors: list = []
        skeleton = _skeleton(obj, "checkpoint", tensors)
        files = {}
        for n, shard in enumerate(_shards(tensors, max_shard_bytes)):
            files[f"tensors-{n:05d}.safetensors"] = _write(tmp / f"tensors-{n:05d}.safetensors", save_file, shard)
        files[SKELETON] = _write(tmp / SKELETON, torch.save, skeleton)
        if files[SKELETON] > max_shard_bytes:  # key names and loop states: kilobytes, but not split if larger
            warnings.warn(f"{folder.name}/{SKELETON} has {files[SKELETON]} bytes, over {max_shard_bytes=}")
        index = {"format": FORMAT, "max_shard_bytes": max_shard_bytes, "files": files,
                 "total_bytes": sum(files.values())}
        _write(tmp / INDEX, lambda text, path: Path(path).write_text(text), json.dumps(index, indent=1))
    except BaseException:
        _remove(tmp)
        raise
    _swap(tmp, folder)


def load_sharded(folder, map_location: Any | None = None) -> dict:
    """The dict `save_sharded` wrote to `folder` (or, after a crash mid-swap, to its `.old` sibling).

    map_location: a device or device string for the tensors; anything else (Lightning's callables) loads to CPU.
    """
    folder = Path(_existing(folder))
    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
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
    tensors = {}
    for name in (n for n in index["files"] if n.endswith(".safetensors")):
        try:
            tensors.update(load_file(folder / name, device=device))
        except safetensors.SafetensorError as err:
            raise ValueError(f"checkpoint shard {folder / name} is corrupt: {err}") from err
    try:
        skeleton = torch.load(folder / SKELETON, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{folder / SKELETON} is corrupt: {err}") from err
    return _fill(skeleton, tensors, folder)


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


def _fill(node, tensors: dict, folder: Path):
    """The inverse of `_skeleton`: markers replaced by the loaded tensors, chunks put back together."""
    if isinstance(node, dict) and _MARK in node:
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


def _write(path: Path, save, obj) -> int:
    """save(obj, path), flushed to disk; its size in bytes."""
    save(obj, str(path))
    _fsync(path)
    return path.stat().st_size


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap(tmp: Path, folder: Path) -> None:
    """Puts the complete `tmp` at `folder`. Between the two renames the previous `folder` is only at `.NAME.old`.

    One writer per path: half-written `.NAME.tmp-*` folders of earlier (crashed) processes are removed.
    """
    old = _old(folder)
    _fsync(tmp)
    if os.path.lexists(folder):
        _remove(old)  # left by a crash after the second rename: `folder` is the complete one
        os.replace(folder, old)
    os.replace(tmp, folder)
    _fsync(folder.parent)
    _remove(old)
    _remove_stale_temporaries(folder)


def _remove_stale_temporaries(path: Path) -> None:
    """Half-written `.NAME.tmp-*` siblings of `path` left by crashed processes (one writer per path)."""
    for name in os.listdir(path.parent):
        if name.startswith(f".{path.name}.tmp-"):
            _remove(path.parent / name)


def _old(path) -> Path:
    return Path(path).parent / f".{Path(path).name}.old"


def _existing(path):
    """`path`, or its `.old` sibling where a crash mid-swap left only that."""
    return _old(path) if not os.path.lexists(path) and os.path.lexists(_old(path)) else path


def _remove(path) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)  # a symlink (ModelCheckpoint's save_last="link") goes, not what it points to
    elif os.path.isdir(path):
        shutil.rmtree(path)
