"""Crash-safe file operations: a file or folder is written beside its destination, flushed to disk and swapped
into place, so that a killed save leaves the previous one whole (one writer per path)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def write(path: Path, save, obj) -> int:
    """save(obj, path), flushed to disk; its size in bytes."""
    save(obj, str(path))
    fsync(path)
    return path.stat().st_size


def fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap(tmp: Path, folder: Path) -> None:
    """Puts the complete `tmp` at `folder`. Between the two renames the previous `folder` is only at `.NAME.old`.

    One writer per path: half-written `.NAME.tmp-*` folders of earlier (crashed) processes are removed.
    """
    previous = old_sibling(folder)
    fsync(tmp)
    if os.path.lexists(folder):
        remove(previous)  # left by a crash after the second rename: `folder` is the complete one
        os.replace(folder, previous)
    os.replace(tmp, folder)
    fsync(folder.parent)
    remove(previous)
    remove_stale_temporaries(folder)


def remove_stale_temporaries(path: Path) -> None:
    """Half-written `.NAME.tmp-*` siblings of `path` left by crashed processes (one writer per path)."""
    for name in os.listdir(path.parent):
        if name.startswith(f".{path.name}.tmp-"):
            remove(path.parent / name)


def old_sibling(path) -> Path:
    return Path(path).parent / f".{Path(path).name}.old"


def existing(path):
    """`path`, or its `.old` sibling where a crash mid-swap left only that."""
    return old_sibling(path) if not os.path.lexists(path) and os.path.lexists(old_sibling(path)) else path


def remove(path) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)  # a symlink (ModelCheckpoint's save_last="link") goes, not what it points to
    elif os.path.isdir(path):
        shutil.rmtree(path)
