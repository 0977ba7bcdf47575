"""The three losses of DMD (Yin et al. 2024) as pure functions of networks and tensors, and as configured callables.

distribution_matching_loss / DMLoss:   generator, paper Eq. 7-8 and Algorithm 2.
denoising_loss / DenoisingLoss:        fake score, paper Eq. 6 (the teacher's own training loss, on generator samples).
Regression losses:                     paper Eq. 9, LPIPS / L2 / pseudo-Huber (App. I ablates LPIPS vs L2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmd_lightning.denoisers import Denoiser, guided
from dmd_lightning.errors import ConfigError
from dmd_lightning.frozen import EvalOnly
from dmd_lightning.loading import load_weights
from dmd_lightning.schedule import expand_like


def _per_sample_mean(x: Tensor) -> Tensor:
    return x.flatten(1).mean(dim=1)


def distribution_matching_loss(
    x: Tensor,
    real: Denoiser,
    fake: Denoiser | None,
    cond=None,
    guidance_scale: float = 1.0,
    t_range: tuple[float, float] = (0.02, 0.98),
    t: Tensor | None = None,
    normalize: bool = True,
    eps: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DMD generator loss whose gradient w.r.t. x is the distribution-matching gradient (paper Eq. 7-8).

    x: generator samples (B, ...), with grad. t ~ U[t_range * T] and eps ~ N(0, I) unless given. The real denoiser runs with
    classifier-free guidance, the fake one without. grad = (mu_fake - mu_real) / mean|x - mu_real| per
    sample (Eq. 8's weighting w_t); descending moves x from the fake towards the real distribution.
    fake=None is the 'real score only' ablation: mu_fake is replaced by x itself (pure mode seeking).
    Returns 0.5 * mean (x - stopgrad(x - grad))^2, mean-reduced over elements as the reference code does,
    and statistics of the weighting.
    """
    schedule = real.schedule
    with torch.no_grad():
        if t is None:
            t = schedule.sample_t(x.shape[0], *t_range, device=x.device)
        x0 = x.detach().float()
        x_t = schedule.add_noise(x0, torch.randn_like(x0) if eps is None else eps.to(x0), t)
        mu_real = guided(real, x_t, t, cond, guidance_scale).float()
        mu_fake = fake(x_t, t, cond).float() if fake is not None else x0
        grad = mu_fake - mu_real
        scale = _per_sample_mean((x0 - mu_real).abs()) if normalize else x0.new_ones(x0.shape[0])
        grad = grad / expand_like(scale, grad)
        nonfinite = (~torch.isfinite(grad)).sum()
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    loss = 0.5 * F.mse_loss(x.float(), (x0 - grad), reduction="mean")
    stats = {
        "dm/weight_mean": (1 / scale).mean(),
        "dm/weight_min": (1 / scale).min(),
        "dm/weight_max": (1 / scale).max(),
        "dm/grad_norm": grad.flatten(1).norm(dim=1).mean(),
        "dm/nonfinite": nonfinite.float(),
        "dm/t_mean": t.float().mean(),
    }
    return loss, stats


def denoising_loss(fake: Denoiser, x: Tensor, cond=None, t: Tensor | None = None, eps: Tensor | None = None) -> Tensor:
    """Fake-score loss on detached generator samples: t over the whole range, weighted as the fake network's
    own parameterization is trained (epsilon: SNR, v: SNR + 1, x_0: 1), i.e. its plain MSE. t and eps are
    drawn from the global RNG unless given."""
    schedule = fake.schedule
    x0 = x.detach()
    if t is None:
        t = torch.randint(0, schedule.T, (x0.shape[0],), device=x0.device)
    x_t = schedule.add_noise(x0, torch.randn_like(x0) if eps is None else eps.to(x0), t)
    err = _per_sample_mean((fake(x_t, t, cond).float() - x0.float()) ** 2)
    return (schedule.loss_weight(t).to(err) * err).mean()


@dataclass(frozen=True)
class DMLoss:
    """The generator's distribution-matching term as a config sets it: `weight` in the generator's loss (0: the
    regression-only ablation), the real score's classifier-free `guidance_scale`, t ~ U[t_range * T], and
    `use_fake_score=False` for the real-score-only ablation (paper Table 2), which also leaves the fake score
    untrained. Called with the t and eps the module draws for the global batch."""

    weight: float = 1.0
    guidance_scale: float = 1.0
    t_range: tuple[float, float] = (0.02, 0.98)
    use_fake_score: bool = True

    def __call__(self, x: Tensor, real: Denoiser, fake: Denoiser, cond, t: Tensor, eps: Tensor):
        fake = fake if self.use_fake_score else None
        return distribution_matching_loss(x, real, fake, cond, self.guidance_scale, t=t, eps=eps)


@dataclass(frozen=True)
class DenoisingLoss:
    """The fake score's term (paper Eq. 6) at t ~ U[t_range * T]: the whole schedule in DMD, where the fake
    score must follow the generator's distribution at every noise level the DM loss (and DMD2's GAN) reads it."""

    t_range: tuple[float, float] = (0.0, 1.0)

    def __call__(self, fake: Denoiser, x: Tensor, cond, t: Tensor, eps: Tensor) -> Tensor:
        return denoising_loss(fake, x, cond, t, eps)


class L2Loss(nn.Module):
    """Mean squared error per sample (the paper's App. I ablation)."""

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return _per_sample_mean((pred.float() - target.float()) ** 2).mean()


class PseudoHuberLoss(nn.Module):
    """sqrt(||pred - target||^2 + c^2) - c with c = 0.00054 sqrt(d) (Song & Dhariwal 2023, iCT Sec. 3.3)."""

    def __init__(self, c: float | None = None):
        super().__init__()
        self.c = c

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        d = pred[0].numel()
        c = self.c if self.c is not None else 0.00054 * d**0.5
        sq = (pred.float() - target.float()).flatten(1).pow(2).sum(dim=1)
        return ((sq + c**2).sqrt() - c).mean()


class LPIPSLoss(EvalOnly):
    """LPIPS (Zhang et al. 2018, VGG) on images in [-1, 1], resized to `resize` (224 in the DMD paper).

    The lpips package ships its linear heads; the VGG16 backbone comes from `backbone_weights`, a local
    torchvision VGG16 state dict (safe-loaded). Without it the backbone stays random, which only tests may ask
    for (`random_backbone=True`).
    """

    def __init__(self, backbone_weights: str | None = None, resize: int | None = 224, random_backbone: bool = False):
        super().__init__()
        import lpips

        if backbone_weights is None and not random_backbone:
            raise ConfigError(
                "LPIPSLoss needs backbone_weights: a local torchvision VGG16 state dict (vgg16-397923af.pth); "
                "pretrained weights cannot be downloaded here. Use L2Loss or PseudoHuberLoss without them."
            )
        self.lpips = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        if backbone_weights is not None:
            load_vgg_backbone(self.lpips.net, backbone_weights)
        self.lpips.requires_grad_(False).eval()
        self.resize = resize

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        if pred.shape[1] == 1:  # grey images: LPIPS expects RGB
            pred, target = pred.expand(-1, 3, -1, -1), target.expand(-1, 3, -1, -1)
        if self.resize is not None and pred.shape[-1] != self.resize:
            size = (self.resize, self.resize)
            pred = F.interpolate(pred.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
            target = F.interpolate(target.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        return self.lpips(pred.float(), target.float()).mean()


def load_vgg_backbone(lpips_vgg: nn.Module, path: str) -> None:
    """Copy a torchvision VGG16 state dict ('features.N.weight', ...) into lpips' sliced VGG."""
    state = load_weights(path)
    mapped = {}
    for name, _ in lpips_vgg.named_parameters():  # 'slice1.0.weight' <- 'features.0.weight'
        _, idx, kind = name.split(".")
        mapped[name] = state[f"features.{idx}.{kind}"]
    lpips_vgg.load_state_dict(mapped, strict=True)
