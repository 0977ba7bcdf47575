"""FID on Fashion-MNIST: the project's classifier (fmnist/classifier.py) as torch-fidelity feature extractor
(registered as FMNIST_EXTRACTOR when this module is imported), and FIDEvaluator for DMDModule's validation,
against a Fashion-MNIST split zero-padded to 32x32 like the model's images."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from dmd_lightning.errors import ConfigError
from dmd_lightning.fmnist.classifier import FEATURE_DIM, load_classifier
from dmd_lightning.fmnist.data import DEFAULT_ROOT, load_fashion_mnist, to_model_space
from dmd_lightning.images import to_uint8
from dmd_lightning.metrics.evaluation import Evaluator, gather_samples
from dmd_lightning.metrics.fid import compute_metrics

FMNIST_EXTRACTOR = "fmnist-classifier"


def uint8_to_classifier_input(x: Tensor, size: int = 32) -> Tensor:
    """torch-fidelity's uint8 (N, C, H, W) -> float (N, 1, size, size) in [-1, 1], as `to_model_space`:
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


class FIDEvaluator(Evaluator):
    """FID and KID of the validation samples against a Fashion-MNIST split, features by `extractor`.

    update() keeps the samples as uint8 on the CPU. Under DDP, compute() gathers every rank's samples and every
    rank computes the same metrics from the same gathered set (so `log(..., sync_dist=True)` averages equal
    values); the batches DistributedSampler repeats never reach update(). The extractor runs on CUDA when available.
    The reference split is zero-padded to 32x32 like the model's images and featurised only on the first
    compute() for given reference images and weights file; later ones load its features from `cache_dir`."""

    def __init__(self, weights_path: str, data_root: str = DEFAULT_ROOT, reference_split: str = "test",
                 extractor: str = FMNIST_EXTRACTOR, cache_dir: str = "runs/fid_cache", kid: bool = True,
                 max_reference: int | None = None, kid_subsets: int = 100, kid_subset_size: int = 1000,
                 batch_size: int = 256):
        super().__init__()
        self.weights_path, self.data_root, self.reference_split = weights_path, data_root, reference_split
        self.extractor, self.cache_dir, self.kid, self.max_reference = extractor, cache_dir, kid, max_reference
        self.kid_subsets, self.kid_subset_size, self.batch_size = kid_subsets, kid_subset_size, batch_size
        self.samples: list[Tensor] = []  # a plain list, so it stays out of state_dict

    def reference_name(self, reference: Tensor) -> str:
        """The reference's cache name: its split and size, and a digest of its images (another data root, or files
        or padding changed in place, never reads stale features)."""
        digest = hashlib.sha256(reference.numpy().tobytes()).hexdigest()[:12]
        return f"fmnist-{self.reference_split}-{self.max_reference or 'all'}-{digest}"

    def reference(self) -> Tensor:
        """uint8 (M, 1, 32, 32): the split's first `max_reference` images, padded as `to_model_space`."""
        images, _ = load_fashion_mnist(self.data_root, self.reference_split)
        return to_uint8(to_model_space(images[:self.max_reference]))

    def reset(self) -> None:
        self.samples = []

    def update(self, samples: Tensor, batch: dict | None = None) -> None:
        self.samples.append(to_uint8(samples.detach()).cpu())

    def compute(self) -> dict[str, float]:
        local = torch.cat(self.samples) if self.samples else torch.zeros(0, 1, 32, 32, dtype=torch.uint8)
        samples = gather_samples(local)
        if len(samples) < 2:
            return {}
        reference = self.reference()
        m = compute_metrics(samples, reference, self.extractor, weights_path=self.weights_path,
                            cache_dir=self.cache_dir, reference_name=self.reference_name(reference), kid=self.kid,
                            kid_subsets=self.kid_subsets, kid_subset_size=self.kid_subset_size,
                            batch_size=self.batch_size)
        return {"fid": m["fid"], **({"kid": m["kid_mean"]} if self.kid else {})}
