"""Exponential moving average of the generator's weights, used for validation and export."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameters and floating buffers alike."""
    for e, m in zip(ema.parameters(), model.parameters()):
        e.lerp_(m.detach().to(e.dtype), 1 - decay)
    for e, m in zip(ema.buffers(), model.buffers()):
        if e.is_floating_point():
            e.lerp_(m.to(e.dtype), 1 - decay)
        else:
            e.copy_(m)
