"""DMD2's GAN (Yin et al. 2024b, Sec. 4.3): a classifier on the fake score's bottleneck features tells real
images from generator samples, both noised at the same t; its gradient also trains the fake-score backbone.

The features are those of the fake-score UNet's middle block during a forward pass at (x_t, t), caught by a
forward hook, so the fake score needs no second network. The losses are the non-saturating ones of the paper:
the generator minimises softplus(-D(fake)), the classifier softplus(D(fake)) + softplus(-D(real)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmd_lightning.denoisers import Denoiser
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
        if getattr(unet, "mid_block", None) is None:
            raise ConfigError("the GAN classifier needs a fake score built on a diffusers UNet with a mid_block")
        channels = unet.config["block_out_channels"][-1]
        hidden = hidden or channels
        self.head = nn.Sequential(nn.Conv2d(channels, hidden, 3, stride=2, padding=1),
                                  nn.GroupNorm(min(32, hidden // 4) or 1, hidden), nn.SiLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, 1))

    def forward(self, denoiser: Denoiser, x_t: Tensor, t: Tensor, cond=None, frozen: bool = False) -> Tensor:
        """Logits (B,) from the features of `denoiser` (the fake score this head was built for) at (x_t, t).

        frozen: the gradient reaches x_t only, not the fake score or this head (the generator's GAN term): no
        backward pass of the generator's loss touches their parameters (which DDP requires); see _GradToInputOnly.
        """
        if frozen:
            return _GradToInputOnly.apply(x_t, lambda x: self._logits(denoiser, x, t, cond))
        return self._logits(denoiser, x_t, t, cond)

    def _logits(self, denoiser: Denoiser, x_t: Tensor, t: Tensor, cond) -> Tensor:
        caught = []

        def catch(module, inputs, output):
            caught.append(output)
            raise _Caught  # the up-sampling half is not needed: stop the forward pass here

        hook = denoiser.unet.mid_block.register_forward_hook(catch)
        try:
            denoiser(x_t, t, cond)
        except _Caught:
            pass
        finally:
            hook.remove()
        return self.head(caught[0].float()).squeeze(1)


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


class _Caught(Exception):
    pass


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
