"""AdamW and the learning-rate schedule shared by DMDModule and the teacher's training."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dmd_lightning.errors import ConfigError


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


@dataclass(frozen=True)
class Optimization:
    """How DMDModule updates its two networks: AdamW (`generator_lr`, `fake_lr`, `weight_decay`, `betas`), each lr
    warmed up over `warmup_steps` updates, then constant (`lr_decay="constant"`) or a half cosine to
    `min_lr_ratio` x lr by `decay_steps` generator updates (default: from the trainer's max_steps); gradients
    clipped to norm `gradient_clip`; `accumulate` micro-batches per update (gradient accumulation: the same update
    as one batch `accumulate` times larger, with one optimizer step and, under DDP, one gradient all-reduce)."""

    generator_lr: float = 1e-5
    fake_lr: float = 1e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 500
    lr_decay: str = "constant"
    decay_steps: int | None = None
    min_lr_ratio: float = 0.0
    gradient_clip: float = 10.0
    accumulate: int = 1

    def decay_updates(self, max_steps: int | None, steps_per_update: int) -> int | None:
        """Generator updates over which a cosine lr decays: `decay_steps`, else the trainer's max_steps (optimizer
        steps of both networks, `steps_per_update` per generator update); None for a constant lr."""
        if self.lr_decay == "constant":
            return None
        if self.decay_steps is not None:
            return self.decay_steps
        if max_steps is None or max_steps <= 0:
            raise ConfigError("lr_decay='cosine' needs decay_steps or the trainer's max_steps")
        return max(1, max_steps // steps_per_update)

    def build(self, generator: nn.Module, fake: list[nn.Module | None], ratio: int, max_steps: int | None,
              steps_per_update: int):
        """DMDModule's ([generator AdamW, fake-score AdamW], [their schedules]) over the parameters that train (LoRA
        adapters, not their frozen base); the fake score takes `ratio` updates per generator update, so its cosine
        decay spans `ratio` times as many."""
        total = self.decay_updates(max_steps, steps_per_update)
        trainable = lambda nets: [p for net in nets if net is not None for p in net.parameters() if p.requires_grad]
        opt_g, sch_g = adamw_with_schedule(trainable([generator]), self.generator_lr, tuple(self.betas),
                                           self.weight_decay, self.warmup_steps, total, self.min_lr_ratio)
        opt_f, sch_f = adamw_with_schedule(trainable(fake), self.fake_lr, tuple(self.betas), self.weight_decay,
                                           self.warmup_steps, total and total * ratio, self.min_lr_ratio)
        return [opt_g, opt_f], [sch_g, sch_f]
