"""Offline FID and KID with torch-fidelity: the project's Fashion-MNIST classifier (or a local Inception file)
as feature extractor, reference statistics cached on disk, and an Evaluator for DMDModule's validation.

Nothing here downloads: every extractor takes a local weights file. torch-fidelity keys its cache on
(input name, extractor name) only, so the cache name used here also folds in a digest of the weights file.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch_fidelity
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from . import fmnist
from .classifier import FEATURE_DIM, FMNISTClassifier
from .errors import ConfigError
from .evaluation import Evaluator

FMNIST_EXTRACTOR = "fmnist-classifier"
INCEPTION_EXTRACTOR = "inception-v3-compat"


def load_classifier(path: str | Path) -> FMNISTClassifier:
    """An FMNISTClassifier in eval mode from a local state dict (.safetensors, or a torch .pt/.pth)."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"classifier weights {path!r} not found; train one and save its state dict there")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    net = FMNISTClassifier()
    net.load_state_dict(state)
    return net.requires_grad_(False).eval()


def uint8_to_classifier_input(x: Tensor, size: int = 32) -> Tensor:
    """torch-fidelity's uint8 (N, C, H, W) -> float (N, 1, size, size) in [-1, 1], as `fmnist.to_model_space`:
    channels averaged (grey images come replicated to RGB), 28x28 zero-padded with background, other sizes resized."""
    x = x.float().mean(1, keepdim=True).div(127.5).sub(1)
    if x.shape[-2:] == (size, size):
        return x
    if x.shape[-1] == x.shape[-2] == 28 and size > 28:
        pad = (size - 28) // 2
        return F.pad(x, (pad, size - 28 - pad) * 2, value=-1.0)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class FMNISTFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor: features '256' (penultimate, for FID/KID) and 'logits' of an FMNISTClassifier
    loaded from `feature_extractor_weights_path`. Input: uint8 (N, 3, H, W), as torch-fidelity feeds it."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ConfigError(f"feature extractor {name!r} needs feature_extractor_weights_path (a local file)")
        self.net = load_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return (str(FEATURE_DIM), "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": str(FEATURE_DIM), "kid": str(FEATURE_DIM), "prc": str(FEATURE_DIM)}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"expected uint8 (N, C, H, W) images, got {x.dtype} {tuple(x.shape)}")
        feats = self.net.features(uint8_to_classifier_input(x))
        out = {str(FEATURE_DIM): feats, "logits": self.net.out(feats)}
        return tuple(out[name].float() for name in self.features_list)


if FMNIST_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:  # guards re-imports (importlib.reload, test runners)
    register_feature_extractor(FMNIST_EXTRACTOR, FMNISTFeatureExtractor)


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


def fidelity_kwargs(samples: Dataset, reference: Dataset | str, extractor: str = FMNIST_EXTRACTOR, *,
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


def compute_metrics(samples: Tensor, reference: Tensor | Dataset | str, extractor: str = FMNIST_EXTRACTOR, *,
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


def gather_samples(x: Tensor) -> Tensor:
    """Concatenate a CPU tensor over all DDP ranks (rank order); the tensor itself without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, x)
    return torch.cat(parts)


class FIDEvaluator(Evaluator):
    """FID and KID of the validation samples against a Fashion-MNIST split, features by `extractor`.

    update() keeps the samples as uint8 on the CPU. Under DDP, compute() gathers every rank's samples and every
    rank computes the same metrics from the same gathered set (so `log(..., sync_dist=True)` averages equal
    values); DistributedSampler's padding may repeat a few samples. The extractor runs on CUDA when available.
    The reference split is zero-padded to 32x32 like the model's images and featurised only on the first
    compute() for a given (split, max_reference, weights file); later ones load its features from `cache_dir`."""

    def __init__(self, weights_path: str, data_root: str = fmnist.DEFAULT_ROOT, reference_split: str = "test",
                 extractor: str = FMNIST_EXTRACTOR, cache_dir: str = "runs/fid_cache", kid: bool = True,
                 max_reference: int | None = None, kid_subsets: int = 100, kid_subset_size: int = 1000,
                 batch_size: int = 256):
        super().__init__()
        self.weights_path, self.data_root, self.reference_split = weights_path, data_root, reference_split
        self.extractor, self.cache_dir, self.kid, self.max_reference = extractor, cache_dir, kid, max_reference
        self.kid_subsets, self.kid_subset_size, self.batch_size = kid_subsets, kid_subset_size, batch_size
        self.samples: list[Tensor] = []  # a plain list, so it stays out of state_dict

    @property
    def reference_name(self) -> str:
        return f"fmnist-{self.reference_split}-{self.max_reference or 'all'}"

    def reference(self) -> Tensor:
        """uint8 (M, 1, 32, 32): the split's first `max_reference` images, padded as `fmnist.to_model_space`."""
        images, _ = fmnist.load_fashion_mnist(self.data_root, self.reference_split)
        return fmnist.to_uint8(fmnist.to_model_space(images[:self.max_reference]))

    def reset(self) -> None:
        self.samples = []

    def update(self, samples: Tensor, batch: dict | None = None) -> None:
        self.samples.append(fmnist.to_uint8(samples.detach()).cpu())

    def compute(self) -> dict[str, float]:
        local = torch.cat(self.samples) if self.samples else torch.zeros(0, 1, 32, 32, dtype=torch.uint8)
        samples = gather_samples(local)
        if len(samples) < 2:
            return {}
        m = compute_metrics(samples, self.reference(), self.extractor, weights_path=self.weights_path,
                            cache_dir=self.cache_dir, reference_name=self.reference_name, kid=self.kid,
                            kid_subsets=self.kid_subsets, kid_subset_size=self.kid_subset_size,
                            batch_size=self.batch_size)
        return {"fid": m["fid"], **({"kid": m["kid_mean"]} if self.kid else {})}
