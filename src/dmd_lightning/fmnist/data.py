"""Fashion-MNIST from its idx files (Debian's dataset-fashion-mnist, or torchvision's download folder)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dmd_lightning.data.stream import RealImages
from dmd_lightning.errors import DataNotFoundError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz", root / "FashionMNIST" / "raw" / name,
                      root / "FashionMNIST" / "raw" / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataNotFoundError(
        f"Fashion-MNIST file {name}(.gz) not found under data root {str(root)!r}. "
        "Install it with `apt-get install dataset-fashion-mnist` (files land in "
        f"{DEFAULT_ROOT}) or point --data.init_args.data_root at a folder holding the idx files."
    )


def load_fashion_mnist(root: str | Path = DEFAULT_ROOT, split: str = "train") -> tuple[Tensor, Tensor]:
    """uint8 images (N, 28, 28) and int64 labels (N,)."""
    root = Path(root)
    if not root.is_dir():
        raise DataNotFoundError(
            f"Fashion-MNIST data root {str(root)!r} does not exist. Install it with "
            f"`apt-get install dataset-fashion-mnist` (files land in {DEFAULT_ROOT}) or pass the folder that "
            "holds the idx files."
        )
    images, labels = (_read_idx(_find(root, n)) for n in FILES[split])
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_model_space(images: Tensor, size: int = 32) -> Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, size, size) in [-1, 1], zero-padded (background) to `size`."""
    x = images.float().div(127.5).sub(1).unsqueeze(1)
    pad = (size - x.shape[-1]) // 2
    return F.pad(x, (pad, size - x.shape[-1] - pad) * 2, value=-1.0) if pad > 0 else x


class FashionMNISTImages(RealImages):
    """A Fashion-MNIST split as real images for DMD2's GAN: (N, 1, 32, 32) in [-1, 1] and their labels."""

    def __init__(self, data_root: str = DEFAULT_ROOT, split: str = "train"):
        images, self.labels = load_fashion_mnist(data_root, split)
        self.images = to_model_space(images)
