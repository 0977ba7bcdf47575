"""Evaluators: accumulate the EMA generator's validation samples and reduce them to metrics."""

from __future__ import annotations

from torch import Tensor, nn


class Evaluator(nn.Module):
    """reset() at the start of validation, update() per batch, compute() -> {name: value} at its end."""

    def reset(self) -> None:
        raise NotImplementedError

    def update(self, samples: Tensor, batch: dict) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError
