"""dmd-lightning: One-step Diffusion with Distribution Matching Distillation (DMD, DMD2) in PyTorch Lightning."""

from .denoisers import Denoiser, PretrainedUNetDenoiser, UNetDenoiser, guided
from .generator import OneStepGenerator
from .losses import L2Loss, LPIPSLoss, PseudoHuberLoss, denoising_loss, distribution_matching_loss
from .module import DMDModule
from .schedule import VPSchedule

__all__ = [
    "DMDModule",
    "Denoiser",
    "L2Loss",
    "LPIPSLoss",
    "OneStepGenerator",
    "PretrainedUNetDenoiser",
    "PseudoHuberLoss",
    "UNetDenoiser",
    "VPSchedule",
    "denoising_loss",
    "distribution_matching_loss",
    "guided",
]
