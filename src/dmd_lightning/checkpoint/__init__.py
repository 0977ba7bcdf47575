"""Checkpoints of DMD runs: when they are written, where `--ckpt_path last` finds them, how they are stored.

- `callback.py`: `ModelCheckpoint` (Lightning's, plus `last.ckpt` at the end of training and a saved stop on
  SIGTERM / SIGINT) and `find_last_checkpoint`;
- `io.py`: the Trainer's checkpoint plugins, `CheckpointIO` (single files, written crash-safely, loaded with
  weights_only=True) and `ShardedCheckpointIO` (folders of safetensors files of at most 15 MiB);
- `sharded.py`: that folder format as plain functions, `save_sharded` / `load_sharded`;
- `files.py`: the crash-safe file operations they share (write beside, fsync, swap into place).

Configs name the classes by the package: `dmd_lightning.checkpoint.ModelCheckpoint`,
`dmd_lightning.checkpoint.ShardedCheckpointIO`.
"""

from dmd_lightning.checkpoint.callback import ModelCheckpoint, Stopped, find_last_checkpoint
from dmd_lightning.checkpoint.io import CheckpointIO, ShardedCheckpointIO, load_checkpoint_file
from dmd_lightning.checkpoint.sharded import load_sharded, save_sharded

__all__ = ["CheckpointIO", "ModelCheckpoint", "ShardedCheckpointIO", "Stopped", "find_last_checkpoint",
           "load_checkpoint_file", "load_sharded", "save_sharded"]
