"""SampleWriter: `dmd predict` writes the EMA generator's one-step samples (fixed seeds) as PNGs or one .npz;
a latent generator's samples are decoded to images first (`vae`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from dmd_lightning.images import to_uint8
from dmd_lightning.rng import batch_seed


class SampleWriter(BasePredictionWriter):
    """out: a folder (one PNG per sample, named by its index and label) or a path ending in .npz
    (arrays `images` uint8 (N, H, W, C), and `labels` or `prompts` where the samples have them). Under DDP
    each rank writes its own part file.

    vae: for a latent generator (Stable Diffusion), the decoder that turns its latents into images, as
    `load_vae` takes it (a pipeline folder or hub id with decoder='kl', a TAESD folder with 'tiny')."""

    def __init__(self, out: str = "runs/samples", vae: str | None = None, decoder: str = "kl"):
        super().__init__(write_interval="batch")
        self.out = Path(out)
        self.vae_path, self.decoder = vae, decoder
        self._vae = None
        self.images: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.prompts: list[str] = []

    @torch.no_grad()
    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        if self.vae_path is None:
            return x
        from dmd_lightning.sd.model import decode_latents, load_vae

        if self._vae is None:
            self._vae = load_vae(self.vae_path, self.decoder).requires_grad_(False).eval()
        self._vae.to(x.device)
        return decode_latents(self._vae, x)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        images = to_uint8(self.to_images(prediction["x"])).permute(0, 2, 3, 1).cpu().numpy()
        cond = prediction.get("cond")  # class labels, or a text-conditional teacher's prompt embeddings
        labels = cond.cpu().numpy() if torch.is_tensor(cond) and cond.ndim == 1 else None
        prompts = list(prediction.get("prompt") or [])
        if self.out.suffix == ".npz":
            self.images.append(images)
            if labels is not None:
                self.labels.append(labels)
            self.prompts += prompts
            return
        from PIL import Image

        self.out.mkdir(parents=True, exist_ok=True)
        index = prediction.get("index")  # each sample's index in the data; else (a user's data) batch by batch
        index = index.tolist() if torch.is_tensor(index) else [batch_seed(pl_module, batch_idx) * len(images) + i
                                                                for i in range(len(images))]
        for i, img in enumerate(images):
            label = f"_{int(labels[i])}" if labels is not None else ""
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(self.out / f"{index[i]:06d}{label}.png")
            if prompts:
                (self.out / f"{index[i]:06d}.txt").write_text(prompts[i] + "\n")

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if self.out.suffix != ".npz" or not self.images:
            return
        path = self.out if trainer.world_size == 1 else self.out.with_suffix(f".rank{trainer.global_rank}.npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"images": np.concatenate(self.images)}
        if self.labels:
            arrays["labels"] = np.concatenate(self.labels)
        if self.prompts:
            arrays["prompts"] = np.array(self.prompts)
        np.savez(path, **arrays)
        self.images, self.labels, self.prompts = [], [], []
