"""AdamW and the learning-rate schedule shared by DMDModule and the teacher's training."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, warmup_steps: int, decay_steps: int | None = None, min_ratio: float = 0.0) -> float:
    """The lr multiplier after `step` updates: linear warm-up over `warmup_steps`, then constant, or with
    `decay_steps` a half cosine from 1 at the warm-up's end to `min_ratio` at `decay_steps` (and after)."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    if decay_steps is None or step < warmup_steps:
        return warm
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_adamw(params, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused where every parameter allows it (CPU and CUDA floating tensors): one kernel for all
    tensors instead of a Python loop over them, 5x faster on the CPU for a UNet of ~700 tensors."""
    params = list(params)
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)


def adamw_with_schedule(params, lr: float, betas: tuple[float, float], weight_decay: float, warmup_steps: int,
                        decay_steps: int | None = None, min_ratio: float = 0.0):
    """AdamW and its per-update LambdaLR: lr_factor's warm-up, then constant or a half cosine to min_ratio x lr."""
    opt = make_adamw(params, lr, betas, weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup_steps, decay_steps, min_ratio))
