"""Denoisers D(x_t, t, cond) -> x_0 estimate: the one interface that losses and samplers speak to.

Any teacher is adapted to it (cf. the preconditioning wrappers of Karras et al. 2022, NVlabs/edm): the
wrapper knows the network's parameterization and the schedule, callers only see x_0 estimates.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from dmd_lightning.schedule import VPSchedule


class Denoiser(nn.Module):
    """Base class: `forward(x_t, t, cond)` returns the x_0 estimate; `null_cond(cond)` its unconditional twin."""

    schedule: VPSchedule

    def forward(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def predict(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        """The estimate in the schedule's own parameterization (epsilon, v or x_0): a sampler whose scheduler
        takes that parameterization uses it as is. Wrappers of networks that predict it return the output."""
        return self.schedule.from_x0(self(x_t, t, cond), x_t, t, self.schedule.prediction_type)

    def null_cond(self, cond):
        """The condition meaning 'no condition', for classifier-free guidance; None if unsupported."""
        return None


def per_sample(t: Tensor, n: int) -> Tensor:
    """A timestep per sample, (n,), from one t or n; contiguous, one layout for both (a compiled UNet would otherwise
    make a graph for each)."""
    return t.reshape(-1).expand(n).contiguous()


def guided(denoiser: Denoiser, x_t: Tensor, t: Tensor, cond=None, guidance_scale: float = 1.0,
           native: bool = False) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): D_u + w (D_c - D_u), one batched pass. In x_0 space, or
    with native=True in the denoiser's own parameterization (`predict`): the same guidance, since at fixed
    (x_t, t) every parameterization is an affine function of x_0."""
    fn = denoiser.predict if native else denoiser
    null = denoiser.null_cond(cond) if cond is not None else None
    if guidance_scale == 1.0 or null is None:
        return fn(x_t, t, cond)
    both = fn(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, null]))
    d_cond, d_uncond = both.chunk(2)
    return d_uncond + guidance_scale * (d_cond - d_uncond)


class UNetDenoiser(Denoiser):
    """A diffusers UNet (UNet2DModel with class labels, or UNet2DConditionModel with text embeddings).

    Class-conditional UNet2DModel teachers use label `num_class_embeds - 1` as the null label (label dropout).
    Text-conditional UNets take `null_embedding`, the embedding of the empty prompt, shape (1, L, D).
    """

    def __init__(self, unet: nn.Module, schedule: VPSchedule, null_embedding: Tensor | None = None):
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        self.text_conditional = "encoder_hid_dim" in unet.config or "cross_attention_dim" in unet.config
        n_classes = unet.config.get("num_class_embeds")
        self.null_label = n_classes - 1 if n_classes else None
        self.register_buffer("null_embedding", null_embedding, persistent=False)

    def forward(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        t = per_sample(t, x_t.shape[0])
        return self.schedule.to_x0(self.predict(x_t, t, cond).float(), x_t.float(), t)

    def predict(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        t = per_sample(t, x_t.shape[0])
        if self.text_conditional:
            return self.unet(x_t, t, encoder_hidden_states=cond).sample
        return self.unet(x_t, t, class_labels=cond).sample

    def null_cond(self, cond):
        if self.text_conditional and self.null_embedding is not None:
            return self.null_embedding.to(cond.dtype).expand(cond.shape[0], *self.null_embedding.shape[1:])
        if self.null_label is not None:
            return torch.full_like(cond, self.null_label)
        return None


class PretrainedUNetDenoiser(UNetDenoiser):
    """A pixel-space diffusers UNet2DModel loaded with `from_pretrained` from a hub id or a local folder.

    The folder holds `unet/` (or the UNet at its root) and `scheduler/scheduler_config.json`.
    """

    def __init__(self, path: str | Path, gradient_checkpointing: bool = False):
        from diffusers import UNet2DModel

        from dmd_lightning.loading import load_unet

        root = str(path)
        super().__init__(*load_unet(UNet2DModel, root, gradient_checkpointing))
        self.path = root
