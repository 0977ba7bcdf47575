"""Offline FID and KID with torch-fidelity, for any registered feature extractor given by name with a local
weights file (fmnist/fid.py registers the Fashion-MNIST classifier; INCEPTION_EXTRACTOR is torch-fidelity's
Inception), reference statistics cached on disk.

Nothing here downloads: every extractor takes a local weights file. torch-fidelity keys its cache on
(input name, extractor name) only, so the cache name used here also folds in a digest of the weights file.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import torch
import torch_fidelity
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from dmd_lightning.errors import ConfigError

INCEPTION_EXTRACTOR = "inception-v3-compat"


class ImageDataset(Dataset):
    """uint8 images (N, H, W) or (N, C, H, W) as the (3, H, W) uint8 tensors torch-fidelity expects."""

    def __init__(self, images: Tensor):
        if images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images, got {images.dtype}")
        images = images.unsqueeze(1) if images.dim() == 3 else images
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected (N, H, W) or (N, 1|3, H, W) images, got {tuple(images.shape)}")
        self.images = images.cpu()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i].expand(3, -1, -1)


@lru_cache(maxsize=16)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def weights_digest(path: str | Path) -> str:
    """First 12 hex digits of the file's sha256 (memoised per path, size and mtime)."""
    st = os.stat(path)
    return _digest(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def reference_cache_name(reference_name: str, weights_path: str | Path) -> str:
    """torch-fidelity's input2_cache_name: the reference's name plus the weights digest (no path separators)."""
    return f"{reference_name.replace(os.sep, '_')}-{weights_digest(weights_path)}"


def fidelity_kwargs(samples: Dataset, reference: Dataset | str, extractor: str, *,
                    weights_path: str, cache_dir: str | None = None, reference_name: str | None = None,
                    kid: bool = True, kid_subsets: int = 100, kid_subset_size: int = 1000, batch_size: int = 256,
                    cuda: bool | None = None) -> dict:
    """The keyword arguments of `torch_fidelity.calculate_metrics`. Only the reference (input2) is cached, and
    only when `reference_name` is given; the KID subset size shrinks to the smaller input when needed."""
    if extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ConfigError(f"unknown feature extractor {extractor!r}; registered: {sorted(FEATURE_EXTRACTORS_REGISTRY)}")
    if weights_path is None or not os.path.isfile(weights_path):
        raise FileNotFoundError(f"feature extractor weights {weights_path!r} not found (nothing is downloaded)")
    sizes = [len(samples)] + ([len(reference)] if hasattr(reference, "__len__") and not isinstance(reference, str)
                              else [])
    cache = reference_name is not None
    return dict(
        input1=samples, input2=reference, fid=True, kid=kid, feature_extractor=extractor,
        feature_extractor_weights_path=str(weights_path),
        kid_subsets=kid_subsets, kid_subset_size=min([kid_subset_size, *sizes]), batch_size=batch_size,
        cuda=torch.cuda.is_available() if cuda is None else cuda,
        cache=cache, cache_root=cache_dir,
        input2_cache_name=reference_cache_name(reference_name, weights_path) if cache else None,
        save_cpu_ram=True,  # in-memory tensors: no DataLoader worker processes
        verbose=False,
    )


def compute_metrics(samples: Tensor, reference: Tensor | Dataset | str, extractor: str, *,
                    weights_path: str, cache_dir: str | None = None, reference_name: str | None = None,
                    kid: bool = True, kid_subsets: int = 100, kid_subset_size: int = 1000, batch_size: int = 256,
                    cuda: bool | None = None) -> dict[str, float]:
    """FID (and KID) of uint8 samples (N, H, W) or (N, C, H, W) against a reference: uint8 images, a Dataset of
    uint8 (3, H, W), or anything torch-fidelity takes as an input (a folder of images, a registered dataset).

    With `reference_name`, the reference's features and FID statistics are cached under `cache_dir` (default:
    torch-fidelity's, under $TORCH_HOME) and later calls with that name and weights never read the reference.
    Returns {'fid', 'kid_mean', 'kid_std'} (KID only when `kid`)."""
    ref = ImageDataset(reference) if torch.is_tensor(reference) else reference
    kwargs = fidelity_kwargs(ImageDataset(samples), ref, extractor, weights_path=weights_path, cache_dir=cache_dir,
                             reference_name=reference_name, kid=kid, kid_subsets=kid_subsets,
                             kid_subset_size=kid_subset_size,
                             batch_size=batch_size, cuda=cuda)
    out = torch_fidelity.calculate_metrics(**kwargs)
    metrics = {"fid": float(out[torch_fidelity.KEY_METRIC_FID])}
    if kid:
        metrics["kid_mean"] = float(out[torch_fidelity.KEY_METRIC_KID_MEAN])
        metrics["kid_std"] = float(out[torch_fidelity.KEY_METRIC_KID_STD])
    return metrics


