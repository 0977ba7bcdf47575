"""The Trainer's checkpoint plugins: how checkpoints are written and read.

`CheckpointIO` (the trainer's default in `dmd`) writes single-file checkpoints beside their destination and
renames them into place, so a killed save leaves the previous file whole on any filesystem; it loads with
`weights_only=True` and names the file when it is not a checkpoint.

`ShardedCheckpointIO` (a Trainer plugin; YAML: `trainer: {plugins: [{class_path:
dmd_lightning.checkpoint.ShardedCheckpointIO}]}`) stores each checkpoint as a folder named like the file would
be (`last.ckpt/`; the format: sharded.py), so that a run on a machine that hands back only a few files of at most
16 MiB can be resumed elsewhere, and so that loading one never runs pickle code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dmd_lightning.checkpoint.files import existing, fsync, old_sibling, remove, remove_stale_temporaries, write
from dmd_lightning.checkpoint.sharded import load_sharded, load_skeleton, save_sharded
from dmd_lightning.errors import CheckpointError


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
            write(tmp, torch.save, checkpoint)
            os.replace(tmp, path)
        except BaseException:
            remove(tmp)
            raise
        fsync(path.parent)
        remove_stale_temporaries(path)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        if "://" not in str(path) and not os.path.lexists(existing(path)):
            raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
        if os.path.isdir(existing(path)):
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


def load_checkpoint_file(path, tensors: bool = True) -> dict:
    """A checkpoint loaded with weights_only=True, memory-mapped where its format allows (a cheap look at its
    hyper-parameters), or a ShardedCheckpointIO folder (`tensors=False`: its skeleton alone, every tensor None);
    CheckpointError naming the file when it is not one."""
    if os.path.isdir(existing(path)):
        try:
            return load_sharded(path) if tensors else load_skeleton(path)
        except (OSError, ValueError) as err:
            raise CheckpointError(str(err)) from None
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
        if os.path.isdir(existing(path)):
            try:
                return load_sharded(path, map_location)
            except (OSError, ValueError) as err:
                raise CheckpointError(str(err)) from None
        return super().load_checkpoint(path, map_location, weights_only)

    def remove_checkpoint(self, path) -> None:
        remove(path)
        remove(old_sibling(path))

