"""DMD2's GAN (Yin et al. 2024b, Sec. 4.3): a classifier on the fake score's bottleneck features tells real
images from generator samples, each noised at a t of its own from the fake score's range (as the official code
draws them); its gradient also trains the fake-score backbone.

The features are the fake-score UNet's middle-block output at (x_t, t), computed by the UNet's own encoder half
(`unet_bottleneck`), so the fake score needs no second network and the decoder half is never run. The losses are the
non-saturating ones of the paper: the generator minimises softplus(-D(fake)), the classifier softplus(D(fake)) +
softplus(-D(real)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmd_lightning.denoisers import Denoiser, per_sample
from dmd_lightning.errors import ConfigError


class BottleneckClassifier(nn.Module):
    """D(x_t, t, cond) -> one logit per sample, from the middle-block features of `denoiser` (a diffusers UNet).

    Head: 3x3 conv (stride 2), GroupNorm, SiLU, global average pool, linear; small next to the backbone, as the
    official code's conv head on its 8x8 bottleneck. Build it with the fake score's denoiser; it is trained with
    the fake score (the module puts its parameters in the fake score's optimizer).
    """

    def __init__(self, denoiser: Denoiser, hidden: int | None = None):
        super().__init__()
        unet = getattr(denoiser, "unet", None)
        if not isinstance(unet, nn.Module):
            raise ConfigError("the GAN classifier needs a fake score built on a diffusers UNet")
        check_bottleneck(unet)
        channels = unet.config["block_out_channels"][-1]
        hidden = hidden or channels
        self.head = nn.Sequential(nn.Conv2d(channels, hidden, 3, stride=2, padding=1),
                                  nn.GroupNorm(math.gcd(min(32, hidden // 4) or 1, hidden), hidden), nn.SiLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, 1))

    def forward(self, denoiser: Denoiser, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        """Logits (B,) from the features of `denoiser` (the fake score this head was built for) at (x_t, t): the
        classifier's own loss, whose gradient trains this head and the fake score's encoder half."""
        return self._logits(denoiser, x_t, t, cond)

    def input_gradient_only(self, denoiser: Denoiser, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        """The same logits for the generator's GAN term: the gradient reaches x_t only, not the fake score or this
        head, so no backward pass of the generator's loss touches their parameters (which DDP requires); see
        _GradToInputOnly."""
        return _GradToInputOnly.apply(x_t, lambda x: self._logits(denoiser, x, t, cond))

    def _logits(self, denoiser: Denoiser, x_t: Tensor, t: Tensor, cond) -> Tensor:
        return self.head(unet_bottleneck(denoiser, x_t, t, cond).float()).squeeze(1)

    def compile(self, *args, **kwargs) -> None:
        """nn.Module.compile's contract (torch.compile's arguments, in place) for the pass that matters: the logits'
        (the fake score's encoder half and this head), not `input_gradient_only`, which wraps it in an autograd
        Function. The encoder's blocks are the fake score's own modules, which its compiled forward never sees."""
        self._logits = torch.compile(self._logits, *args, **kwargs)


def unet_bottleneck(denoiser: Denoiser, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
    """The middle block's output of `denoiser`'s diffusers UNet at (x_t, t, cond), the UNet's forward pass up to there:
    time (and class) embedding, conv_in, down blocks, middle block; a text-conditional UNet's cross-attention reads
    cond. Equal to what a hook on the middle block catches in a full pass (tested), without the decoder half and
    without stopping the pass by an exception, which torch.compile cannot trace."""
    unet = denoiser.unet
    t = per_sample(t, x_t.shape[0])
    text = {"encoder_hidden_states": cond} if denoiser.text_conditional else {}
    if unet.config.get("center_input_sample"):
        x_t = 2 * x_t - 1.0
    if text:
        emb = unet.time_embedding(unet.get_time_embed(sample=x_t, timestep=t))
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
    else:
        emb = unet.time_embedding(unet.time_proj(t).to(unet.dtype))
        if unet.class_embedding is not None:
            labels = unet.time_proj(cond) if unet.config.get("class_embed_type") == "timestep" else cond
            emb = emb + unet.class_embedding(labels).to(unet.dtype)
    h = unet.conv_in(x_t)
    for block in unet.down_blocks:
        h, _ = block(h, emb, **text) if getattr(block, "has_cross_attention", False) else block(h, emb)
    mid = unet.mid_block
    return mid(h, emb, **text) if getattr(mid, "has_cross_attention", False) else mid(h, emb)


def check_bottleneck(unet: nn.Module) -> None:
    """ConfigError for UNets whose encoder half unet_bottleneck does not reproduce: no middle block, down blocks with
    skip connections of their own, extra embeddings of a text-conditional UNet."""
    config = getattr(unet, "config", {})
    unsupported = [getattr(unet, "mid_block", None) is None and "no mid_block",
                   any(hasattr(b, "skip_conv") for b in getattr(unet, "down_blocks", [])) and "skip down blocks",
                   bool(config.get("addition_embed_type")) and f"addition_embed_type {config['addition_embed_type']}",
                   "cross_attention_dim" in config and getattr(unet, "class_embedding", None) is not None
                   and "class embeddings in a text-conditional UNet",
                   getattr(unet, "encoder_hid_proj", None) is not None and "encoder_hid_proj"]
    if any(unsupported):
        raise ConfigError("the GAN classifier needs a fake score built on a diffusers UNet2DModel or "
                          f"UNet2DConditionModel with a mid_block; this one has {', '.join(filter(None, unsupported))}")


class _GradToInputOnly(torch.autograd.Function):
    """y = f(x) whose backward reaches x alone: torch.autograd.grad(y, x) inside the backward, so f's parameters get
    no gradient and their hooks (DDP's) never fire. f keeps its own parameters, so gradient checkpointing inside f
    recomputes in backward exactly what its forward saved; parameters swapped for detached copies (functional_call)
    are gone by then, and the recomputation would differ (torch's CheckpointError)."""

    @staticmethod
    def forward(ctx, x: Tensor, f) -> Tensor:
        with torch.enable_grad():
            ctx.x = x.detach().requires_grad_(True)
            # f reads a view, not the leaf: hooks that others put on f's input (the module tracker of
            # torch.utils.flop_counter, in perf.Throughput) run inside backward's autograd.grad, which refuses leaves
            ctx.y = f(ctx.x.view_as(ctx.x))
        return ctx.y.detach()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return torch.autograd.grad(ctx.y, ctx.x, grad)[0], None


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss: softplus(-D(G(z)))."""
    return F.softplus(-logits_fake).mean()


def gan_classifier_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Classifier loss: softplus(D(fake)) + softplus(-D(real)) (real images labelled 1, samples 0)."""
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()


@dataclass(frozen=True)
class GANLoss:
    """DMD2's GAN as a config sets it: `generator_weight` x gan_generator_loss joins the generator's loss,
    `classifier_weight` x gan_classifier_loss the fake score's (which trains the head and, through it, the fake
    score's backbone). Defaults: the official ImageNet-64 recipe (gen_cls_loss_weight 3e-3, cls_loss_weight 1e-2).
    Both noise their images at t ~ U[DenoisingLoss.t_range * T], the fake score's range."""

    generator_weight: float = 3e-3
    classifier_weight: float = 1e-2
