"""dmd-lightning: One-step Diffusion with Distribution Matching Distillation (DMD, DMD2) in PyTorch Lightning."""

from dmd_lightning.denoisers import Denoiser, PretrainedUNetDenoiser, UNetDenoiser, guided
from dmd_lightning.gan import GANLoss
from dmd_lightning.generator import OneStepGenerator
from dmd_lightning.losses import (
    DenoisingLoss,
    DMLoss,
    L2Loss,
    LPIPSLoss,
    PseudoHuberLoss,
    denoising_loss,
    distribution_matching_loss,
)
from dmd_lightning.module import DMDModule
from dmd_lightning.optim import Optimization
from dmd_lightning.perf import Compilation
from dmd_lightning.schedule import VPSchedule
from dmd_lightning.update import NonFinite

__all__ = [
    "Compilation",
    "DMDModule",
    "DMLoss",
    "Denoiser",
    "DenoisingLoss",
    "GANLoss",
    "L2Loss",
    "LPIPSLoss",
    "NonFinite",
    "OneStepGenerator",
    "Optimization",
    "PretrainedUNetDenoiser",
    "PseudoHuberLoss",
    "UNetDenoiser",
    "VPSchedule",
    "denoising_loss",
    "distribution_matching_loss",
    "guided",
]
