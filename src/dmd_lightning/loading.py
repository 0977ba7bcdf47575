"""`from_pretrained` from a hub id or a local folder, with one clear error when the weights are absent."""

from __future__ import annotations

import hashlib
import json
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


def load_unet(cls, root: str, gradient_checkpointing: bool = False):
    """(unet, schedule) of a diffusers pipeline folder, hub id or UNet folder (with its scheduler_config.json):
    `cls` (UNet2DModel, UNet2DConditionModel) and the VPSchedule of its scheduler config."""
    from dmd_lightning.schedule import VPSchedule

    unet = load_pretrained(cls, root, unet_folder(root))
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet, load_pretrained(VPSchedule, root, scheduler_folder(root))


def load_weights(path: str) -> dict:
    """A state dict from a .safetensors file, else from a torch file loaded with weights_only=True."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def fingerprint(files: list[Path], root: Path) -> str:
    """Digest of the names (relative to `root`), sizes and modification times of `files`: cheap next to hashing
    every file, and an edited, added or removed one changes it."""
    stats = []
    for p in files:
        st = p.stat()
        stats.append([p.name if p == root else str(p.relative_to(root)), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]
