"""SampleWriter: `dmd predict` writes the EMA generator's one-step samples (fixed seeds) as PNGs or one .npz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from .fmnist import to_uint8


class SampleWriter(BasePredictionWriter):
    """out: a folder (one PNG per sample, named by its index and label) or a path ending in .npz
    (arrays `images` uint8 (N, H, W, C) and `labels`). Under DDP each rank writes its own part file."""

    def __init__(self, out: str = "runs/samples"):
        super().__init__(write_interval="batch")
        self.out = Path(out)
        self.images: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        images = to_uint8(prediction["x"]).permute(0, 2, 3, 1).cpu().numpy()
        labels = prediction["cond"].cpu().numpy() if torch.is_tensor(prediction.get("cond")) else None
        if self.out.suffix == ".npz":
            self.images.append(images)
            if labels is not None:
                self.labels.append(labels)
            return
        from PIL import Image

        self.out.mkdir(parents=True, exist_ok=True)
        start = batch_idx * len(images) * trainer.world_size + trainer.global_rank * len(images)
        for i, img in enumerate(images):
            label = f"_{int(labels[i])}" if labels is not None and labels.ndim == 1 else ""
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(self.out / f"{start + i:06d}{label}.png")

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if self.out.suffix != ".npz" or not self.images:
            return
        path = self.out if trainer.world_size == 1 else self.out.with_suffix(f".rank{trainer.global_rank}.npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"images": np.concatenate(self.images)}
        if self.labels:
            arrays["labels"] = np.concatenate(self.labels)
        np.savez(path, **arrays)
        self.images, self.labels = [], []
