"""Evaluators: accumulate the EMA generator's validation samples and reduce them to metrics."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dmd_lightning.frozen import EvalOnly


class Evaluator(EvalOnly):
    """reset() at the start of validation, update() per batch, compute() -> {name: value} at its end. Its networks
    (feature extractors) stay in eval mode."""

    def reset(self) -> None:
        raise NotImplementedError

    def update(self, samples: Tensor, batch: dict) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


class Evaluators(nn.Module):
    """The evaluator of the EMA generator (metrics `val/<name>`) and, with `raw=True`, a copy of it for the raw
    generator (`val/raw/<name>`): the two differ most when the learning rate is too high."""

    def __init__(self, evaluator: Evaluator | None, raw: bool = False):
        super().__init__()
        self.ema = evaluator
        self.raw = copy.deepcopy(evaluator) if raw and evaluator is not None else None

    def active(self) -> dict[str, tuple[Evaluator, bool]]:
        """Metric prefix -> (evaluator, whether it scores the EMA generator)."""
        pairs = {"val/": (self.ema, True), "val/raw/": (self.raw, False)}
        return {k: v for k, v in pairs.items() if v[0] is not None}

    def reset(self) -> None:
        for evaluator, _ in self.active().values():
            evaluator.reset()

    def compute(self) -> dict[str, float]:
        return {prefix + k: v for prefix, (ev, _) in self.active().items() for k, v in ev.compute().items()}


def gather_samples(x: Tensor) -> Tensor:
    """Concatenate a CPU tensor over all DDP ranks (rank order); the tensor itself without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, x)
    return torch.cat(parts)
