"""Text-to-image evaluation (`dmd validate`): FID against a reference image folder and CLIP score, offline.

The COCO-30k protocol of DMD (Sec. 5.2, following GigaGAN): generated and reference images are resized to 256
with Lanczos (PIL) before Inception features are taken; Inception comes from a local weights file through
torch-fidelity's `inception-v3-compat` extractor. CLIP score is 100 * max(cos(image, text), 0) averaged, with
a transformers CLIPModel from a local folder. Close to, not the same as, the DMD2 code's evaluation
(main/coco_eval): that one takes clean-fid's Inception features, and as CLIP score the mean cosine with each
caption prefixed by "A photo depicts "; figures from here and from the papers compare with that caveat.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from dmd_lightning.images import to_uint8
from dmd_lightning.loading import fingerprint
from dmd_lightning.metrics.evaluation import Evaluator, gather_samples
from dmd_lightning.metrics.fid import INCEPTION_EXTRACTOR, compute_metrics
from dmd_lightning.sd.model import decode_latents, load_vae

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalization
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def upright_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels as the image is meant to be seen: a photo's EXIF orientation applied (a camera's portrait shot is
    stored sideways)."""
    return ImageOps.exif_transpose(image).convert("RGB")


def resize_pil(image: Image.Image, size: int) -> Image.Image:
    """Center crop to a square, then resize to size x size with Lanczos."""
    w, h = image.size
    s = min(w, h)
    if w != h:
        image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return image if s == size else image.resize((size, size), Image.LANCZOS)


def resize_uint8(images: Tensor, size: int) -> Tensor:
    """uint8 (B, 3, H, W) -> uint8 (B, 3, size, size) through PIL's Lanczos filter."""
    out = [np.asarray(resize_pil(Image.fromarray(x.permute(1, 2, 0).cpu().numpy()), size)) for x in images]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


class ImageFolderDataset(Dataset):
    """The images of a folder (sorted by name), each center-cropped and Lanczos-resized: uint8 (3, size, size)."""

    def __init__(self, folder: str | Path, size: int = 256, max_images: int | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"reference image folder {str(folder)!r} not found")
        self.paths = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:max_images]
        if not self.paths:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        with Image.open(self.paths[i]) as image:
            return torch.from_numpy(np.asarray(resize_pil(upright_rgb(image), self.size))).permute(2, 0, 1)


@torch.no_grad()
def clip_scores(model, tokenizer, images: Tensor, prompts: list[str]) -> Tensor:
    """100 * max(cos(CLIP image, CLIP text), 0) per pair (as torchmetrics' CLIPScore); images uint8 (B, 3, H, W)."""
    device = next(model.parameters()).device
    size = model.config.vision_config.image_size
    x = F.interpolate(images.to(device).float() / 255, size=(size, size), mode="bicubic", align_corners=False,
                      antialias=True).clamp(0, 1)
    x = (x - x.new_tensor(CLIP_MEAN)[:, None, None]) / x.new_tensor(CLIP_STD)[:, None, None]
    tokens = tokenizer(prompts, padding=True, truncation=True, max_length=tokenizer.model_max_length,
                       return_tensors="pt").to(device)
    out = model(pixel_values=x.to(model.dtype), **tokens)  # image_embeds / text_embeds: projected embeddings
    img, txt = F.normalize(out.image_embeds.float(), dim=-1), F.normalize(out.text_embeds.float(), dim=-1)
    return (100 * (img * txt).sum(-1)).clamp(min=0)


class TextToImageEvaluator(Evaluator):
    """FID (Inception, COCO-30k protocol) and, with `clip`, CLIP score of the validation samples.

    update() decodes the generator's latents with the teacher's VAE (`vae`, decoder 'kl') or TAESD ('tiny'),
    resizes them to `resolution` with Lanczos and keeps uint8 copies on the CPU; CLIP scores use the batch's
    `prompt` texts (SDDMDDataModule's validation batches carry them; its `val_prompts` is the prompt file).
    compute() gathers every rank's samples; the reference folder is featurised once and cached in `cache_dir`.
    """

    def __init__(self, vae: str, reference_dir: str, inception_weights: str, clip: str | None = None,
                 decoder: Literal["kl", "tiny"] = "kl", resolution: int = 256, max_reference: int | None = None,
                 cache_dir: str = "runs/fid_cache", batch_size: int = 64):
        super().__init__()
        self.vae = load_vae(vae, decoder)
        self.reference_dir, self.inception_weights, self.resolution = reference_dir, inception_weights, resolution
        self.max_reference, self.cache_dir, self.batch_size = max_reference, cache_dir, batch_size
        self.clip = self.clip_tokenizer = None
        if clip is not None:
            from transformers import CLIPModel, CLIPTokenizer

            from dmd_lightning.loading import load_pretrained

            # subfolder "": transformers rejects None
            self.clip = load_pretrained(CLIPModel, clip, "").requires_grad_(False).eval()
            self.clip_tokenizer = load_pretrained(CLIPTokenizer, clip, "")
        self.samples: list[Tensor] = []  # plain lists: they stay out of state_dict
        self.scores: list[Tensor] = []

    def reference_name(self, reference: ImageFolderDataset) -> str:
        """The reference's cache name: its folder, resolution and size, and a fingerprint of the images it reads
        (images replaced, added or removed never read stale features)."""
        where = hashlib.sha256(os.path.abspath(self.reference_dir).encode()).hexdigest()[:8]
        files = fingerprint(reference.paths, Path(self.reference_dir))
        return f"{Path(self.reference_dir).name}-{where}-{self.resolution}-{self.max_reference or 'all'}-{files}"

    def reset(self) -> None:
        self.samples, self.scores = [], []

    @torch.no_grad()
    def update(self, samples: Tensor, batch: dict | None = None) -> None:
        images = resize_uint8(to_uint8(decode_latents(self.vae, samples)).cpu(), self.resolution)
        self.samples.append(images)
        if self.clip is not None:
            if batch is None or "prompt" not in batch:
                raise KeyError("CLIP score needs the batch's 'prompt' texts (SDDMDDataModule serves them)")
            self.scores.append(clip_scores(self.clip, self.clip_tokenizer, images, list(batch["prompt"])).cpu())

    def metric_kwargs(self) -> dict:
        """What compute() passes to fid.compute_metrics besides the samples."""
        reference = ImageFolderDataset(self.reference_dir, self.resolution, self.max_reference)
        return dict(reference=reference, extractor=INCEPTION_EXTRACTOR, weights_path=self.inception_weights,
                    cache_dir=self.cache_dir, reference_name=self.reference_name(reference), kid=False,
                    batch_size=self.batch_size)

    def compute(self) -> dict[str, float]:
        empty = torch.zeros(0, 3, self.resolution, self.resolution, dtype=torch.uint8)
        samples = gather_samples(torch.cat(self.samples) if self.samples else empty)
        out = {}
        if self.clip is not None:
            scores = gather_samples(torch.cat(self.scores) if self.scores else torch.zeros(0))
            out["clip_score"] = float(scores.mean()) if len(scores) else float("nan")
        if len(samples) >= 2:
            kwargs = self.metric_kwargs()
            out["fid"] = compute_metrics(samples, kwargs.pop("reference"), **kwargs)["fid"]
        return out
