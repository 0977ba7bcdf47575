"""`from_pretrained` from a hub id or a local folder, with one clear error when the weights are absent."""

from __future__ import annotations

from pathlib import Path

import torch

# the dtype names configs use, for weights and stored tensors
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class WeightsNotFoundError(FileNotFoundError):
    """A model named by hub id or path could not be loaded (absent, offline, or not a diffusers folder)."""


def _subfolder(root: str, name: str, marker: str) -> str | None:
    """`name` for hub ids and pipeline folders; None for a local folder that holds the component itself."""
    p = Path(root)
    if p.is_dir() and not (p / name).is_dir() and (p / marker).is_file():
        return None
    return name


def unet_folder(root: str) -> str | None:
    return _subfolder(root, "unet", "config.json")


def scheduler_folder(root: str) -> str | None:
    return _subfolder(root, "scheduler", "scheduler_config.json")


def load_pretrained(cls, root: str, subfolder: str | None = None, **kwargs):
    """`cls.from_pretrained(root, subfolder=...)`, turning every 'not there' failure into WeightsNotFoundError."""
    try:
        return cls.from_pretrained(root, subfolder=subfolder, **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        where = f"{root}/{subfolder}" if subfolder else root
        kind = "local folder" if Path(root).exists() else "hub id (or missing local path)"
        raise WeightsNotFoundError(
            f"cannot load {cls.__name__} from {kind} {where!r}: {type(err).__name__}: {str(err).splitlines()[0]}. "
            "Without network access, download the model elsewhere (e.g. `hf download <id> --local-dir DIR`), "
            "copy DIR here and pass its path instead of the hub id."
        ) from None
