"""Stable Diffusion 1.5 (latent text-to-image): the teacher as a denoiser, cached prompt embeddings, the VAE.

A pipeline folder (or hub id) holds unet/, scheduler/, text_encoder/, tokenizer/ and vae/ as diffusers saves
them. With `embed="cache"` the text encoder never runs in a training step: prompts are encoded once by
PromptEmbeddings and read back from a safetensors file (`embed="device"`, sd/data.py: encoded in each step). The
VAE decodes latents, for the LPIPS regression loss (DMD Sec. 3.3 on images, App. C: decoded latents) and for
evaluation, and encodes DMD2's real images once (sd/real.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from dmd_lightning.data.format import map_shard
from dmd_lightning.denoisers import UNetDenoiser
from dmd_lightning.errors import ConfigError
from dmd_lightning.frozen import EvalOnly
from dmd_lightning.loading import WeightsNotFoundError, fingerprint, load_pretrained, load_unet
from dmd_lightning.losses import LPIPSLoss


def load_text_encoder(path: str):
    """(CLIPTokenizer, CLIPTextModel) of a pipeline folder or hub id, the encoder frozen in eval mode."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = load_pretrained(CLIPTokenizer, path, "tokenizer")
    encoder = load_pretrained(CLIPTextModel, path, "text_encoder")
    return tokenizer, encoder.requires_grad_(False).eval()


def tokenize(tokenizer, prompts: list[str]) -> Tensor:
    """(N, L) token ids, padded and truncated to the tokenizer's max length, as StableDiffusionPipeline does."""
    return tokenizer(list(prompts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder: nn.Module, prompts: list[str], batch_size: int = 64) -> Tensor:
    """(N, L, D) last hidden states of the CLIP text encoder, as StableDiffusionPipeline.encode_prompt computes
    them (padded to the tokenizer's max length, no attention mask, no clip skip)."""
    device = next(text_encoder.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        ids = tokenize(tokenizer, prompts[start:start + batch_size])
        out.append(text_encoder(ids.to(device))[0].float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _mmap_safetensors(path: Path, key: str) -> Tensor:
    """One tensor of a safetensors file as a read-only memory map (data.format.map_shard): processes (DDP ranks)
    share the page cache and only the rows indexed are read."""
    array, _ = map_shard(path, (key,))[key]
    with warnings.catch_warnings():  # torch warns that the array is not writable; it is never written
        warnings.simplefilter("ignore")
        return torch.from_numpy(array)


def text_encoder_fingerprint(path: str) -> str | None:
    """loading.fingerprint of a local text encoder's and tokenizer's files (a pipeline folder's text_encoder/ and
    tokenizer/, or the folder itself); None for a hub id."""
    root = Path(path)
    if not root.is_dir():
        return None
    folders = [root / sub for sub in ("text_encoder", "tokenizer") if (root / sub).is_dir()] or [root]
    return fingerprint(sorted(p for folder in folders for p in folder.rglob("*") if p.is_file()), root)


class PromptEmbeddings:
    """Text-encoder outputs of a list of prompts, computed once and stored in `cache_dir`.

    The file `prompt-embeddings-<digest>.safetensors` is keyed by a sha256 of the prompts, the text encoder's
    path (and for a local folder its files' names, sizes and modification times) and the storage dtype, so a
    changed prompt list or encoder, also one replaced in place, never reads stale embeddings. `load`
    returns a memory-mapped (N, L, D) tensor (float16: 77 x 768 x 2 bytes = 118 KB per SD1.5 prompt).
    """

    def __init__(self, text_encoder: str, cache_dir: str = "runs/prompt_cache", batch_size: int = 64,
                 dtype: Literal["float16", "float32"] = "float16"):
        self.text_encoder, self.cache_dir = str(text_encoder), Path(cache_dir)
        self.batch_size, self.dtype = batch_size, dtype

    def path(self, prompts: list[str]) -> Path:
        key = [self.text_encoder, self.dtype, list(prompts), text_encoder_fingerprint(self.text_encoder)]
        h = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
        return self.cache_dir / f"prompt-embeddings-{h}.safetensors"

    def build(self, prompts: list[str], device: torch.device | str | None = None) -> Path:
        """Encode and store the prompts unless their file exists; returns its path."""
        from safetensors.torch import save_file

        path = self.path(prompts)
        if path.is_file():
            return path
        tokenizer, encoder = load_text_encoder(self.text_encoder)
        emb = encode_prompts(tokenizer, encoder.to(device or "cpu"), list(prompts), self.batch_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # ranks building at once never share a file
        save_file({"embeddings": emb.to(getattr(torch, self.dtype)).contiguous()}, str(tmp),
                  metadata={"text_encoder": self.text_encoder, "num_prompts": str(len(prompts))})
        tmp.replace(path)
        return path

    def load(self, prompts: list[str], device: torch.device | str | None = None) -> Tensor:
        """(N, L, D) embeddings of `prompts`, encoding them first if they are not cached."""
        return _mmap_safetensors(self.build(prompts, device), "embeddings")


class SDDenoiser(UNetDenoiser):
    """A Stable Diffusion UNet2DConditionModel and its schedule, loaded from a pipeline folder or hub id.

    cond: prompt embeddings (B, L, D). `null_embedding` is the empty prompt's embedding, the unconditional
    input of classifier-free guidance; it comes from `text_encoder` (default: the same folder) through
    PromptEmbeddings' cache, so the text encoder loads only the first time.
    """

    def __init__(self, path: str, gradient_checkpointing: bool = False, text_encoder: str | None = None,
                 embedding_cache: str = "runs/prompt_cache"):
        from diffusers import UNet2DConditionModel

        root = str(path)
        unet, schedule = load_unet(UNet2DConditionModel, root, gradient_checkpointing)
        null = PromptEmbeddings(text_encoder or root, embedding_cache, dtype="float32").load([""])
        super().__init__(unet, schedule, null_embedding=null.clone())
        self.path = root


def vae_subfolder(path: str, decoder: Literal["kl", "tiny"] = "kl") -> str | None:
    """Where a VAE lies under `path`: pipelines hold it in vae/ (hub ids too), TAESD repositories and bare VAE
    folders at their root (None)."""
    p = Path(path)
    return "vae" if (p / "vae").is_dir() or (decoder == "kl" and not (p / "config.json").is_file()) else None


def load_vae(path: str, decoder: Literal["kl", "tiny"] = "kl") -> nn.Module:
    """The frozen latent decoder: AutoencoderKL of a pipeline (its vae/ subfolder) or, with decoder='tiny',
    diffusers' AutoencoderTiny (TAESD, e.g. 'madebyollin/taesd'). The encoder is dropped: only decode is used."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    cls = {"kl": AutoencoderKL, "tiny": AutoencoderTiny}.get(decoder)
    if cls is None:
        raise ConfigError(f"unknown decoder {decoder!r}; expected 'kl' or 'tiny'")
    vae = load_pretrained(cls, str(path), vae_subfolder(path, decoder))
    vae.encoder = None  # roughly half of the weights, never needed
    if hasattr(vae, "quant_conv"):
        vae.quant_conv = None
    return vae.requires_grad_(False).eval()


def decode_latents(vae: nn.Module, latents: Tensor) -> Tensor:
    """Latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [-1, 1] (not clamped), as the SD pipeline decodes."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    dtype = next(vae.parameters()).dtype
    return vae.decode((latents / vae.config.scaling_factor + shift).to(dtype)).sample.float()


@torch.no_grad()
def encode_images(vae: nn.Module, images: Tensor) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> latents (B, 4, H/8, W/8) in the teacher's space, the inverse of
    decode_latents: the mean of the VAE's posterior, shifted and scaled (deterministic; see sd/real.py)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    param = next(vae.parameters())
    mean = vae.encode(images.to(param.device, param.dtype)).latent_dist.mean
    return (mean.float() - shift) * vae.config.scaling_factor


class DecodedLPIPSLoss(EvalOnly):
    """Regression loss of DMD on latents (App. C): LPIPS between the images decoded from predicted and target
    latents (LPIPSLoss resizes them to 224). The decoder is frozen; gradients reach the predicted latents.

    vae: a pipeline folder / hub id (decoder='kl', its vae/ subfolder) or a TAESD folder / hub id
    (decoder='tiny', less memory, as the paper). Takes (pred_latents, target_latents) like every regression loss.
    """

    def __init__(self, vae: str, lpips: LPIPSLoss, decoder: Literal["kl", "tiny"] = "kl"):
        super().__init__()
        self.vae = load_vae(vae, decoder)
        self.lpips = lpips

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        with torch.no_grad():
            target_images = decode_latents(self.vae, target)
        return self.lpips(decode_latents(self.vae, pred), target_images)


__all__ = ["DecodedLPIPSLoss", "PromptEmbeddings", "SDDenoiser", "WeightsNotFoundError", "decode_latents",
           "encode_images", "encode_prompts", "load_text_encoder", "load_vae", "vae_subfolder"]
