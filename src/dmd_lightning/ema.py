"""Exponential moving average of the generator's weights, used for validation and export."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def ema_tensors(ema: nn.Module, model: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """(ema floats, model floats, ema others, model others): parameters and floating buffers are averaged, the
    other buffers (counters) copied; parameters that do not train (a LoRA's frozen base) are left alone. Worth
    caching: walking a UNet's modules costs more than the update."""
    trained = [(e, m) for e, m in zip(ema.parameters(), model.parameters()) if m.requires_grad]
    pairs = [*trained, *zip(ema.buffers(), model.buffers())]
    floats = [(e, m) for e, m in pairs if e.is_floating_point()]
    others = [(e, m) for e, m in pairs if not e.is_floating_point()]
    return [e for e, _ in floats], [m for _, m in floats], [e for e, _ in others], [m for _, m in others]


@torch.no_grad()
def ema_update(tensors: tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model over ema_tensors(ema, model)."""
    ema_f, model_f, ema_o, model_o = tensors
    if all(e.dtype == m.dtype for e, m in zip(ema_f, model_f)):
        torch._foreach_lerp_(ema_f, [m.detach() for m in model_f], 1 - decay)  # one call for all tensors
    else:
        for e, m in zip(ema_f, model_f):
            e.lerp_(m.detach().to(e.dtype), 1 - decay)
    for e, m in zip(ema_o, model_o):
        e.copy_(m)


def warmup_decay(decay: float, n: int) -> float:
    """The decay of the (n+1)-th update: min(decay, (1 + n) / (10 + n)). Early averages follow the model
    instead of holding on to its initialization, which would otherwise weigh decay**n in the EMA for long."""
    return min(decay, (1 + n) / (10 + n))


class EMA:
    """Keeps the network `ema` the moving average of `model`: `update(n)` after the model's (n+1)-th update, with
    warmup_decay(decay, n) (or `decay` without `warmup`). The tensor lists are built on first use and dropped by
    `reset()`, which a device move needs (it replaces buffers)."""

    def __init__(self, ema: nn.Module, model: nn.Module, decay: float, warmup: bool = True):
        self.ema, self.model, self.decay, self.warmup = ema, model, decay, warmup
        self._tensors: tuple | None = None

    def update(self, n: int) -> None:
        if self._tensors is None:
            self._tensors = ema_tensors(self.ema, self.model)
        ema_update(self._tensors, warmup_decay(self.decay, n) if self.warmup else self.decay)

    def reset(self) -> None:
        self._tensors = None
