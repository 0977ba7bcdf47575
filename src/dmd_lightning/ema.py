"""Exponential moving average of the generator's weights, used for validation and export."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameters and floating buffers alike."""
    ema_params, params = list(ema.parameters()), [p.detach() for p in model.parameters()]
    if all(e.dtype == p.dtype for e, p in zip(ema_params, params)):
        torch._foreach_lerp_(ema_params, params, 1 - decay)  # one call for all tensors
    else:
        for e, m in zip(ema_params, params):
            e.lerp_(m.to(e.dtype), 1 - decay)
    for e, m in zip(ema.buffers(), model.buffers()):
        if e.is_floating_point():
            e.lerp_(m.to(e.dtype), 1 - decay)
        else:
            e.copy_(m)
