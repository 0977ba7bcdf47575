"""Quiet by default: what libraries print on every run about the project's own, intended choices is filtered,
each by its message (and logger or category), so that anything else still reaches the user.

- Lightning warns that modules are in eval mode at the start of training: the frozen teacher and the EMA are.
- Lightning's own use of torch's pytree API raises a deprecation warning (`LeafSpec`) that is not ours to fix.
- Lightning hints at more DataLoader workers: the training batches are drawn by a seeded generator in-process;
  for the same reason `dmd pairs`' shard batches have a length and no per-item indices (PairWriter keys shards
  by the pairs' own `index`), of which Lightning warns too.
- Lightning advertises litlogger and litmodels, and says `weights_only` defaulted to False (our CheckpointIO
  loads with True).
- diffusers says `accelerate` is missing (it only speeds up loading; the project does not depend on it), and that
  `dmd export`'s cast of a UNet to its dtype keeps no module in float32 when there is none to keep (`[]`).
"""

from __future__ import annotations

import logging
import warnings

WARNINGS = (r"Found \d+ module\(s\) in eval mode at the start of training",
            r"`isinstance\(treespec, LeafSpec\)` is deprecated",
            r"The '\w+_dataloader' does not have many workers",
            r"Your `IterableDataset` has `__len__` defined",
            r"Couldn't infer the batch indices fetched from your dataloader")
LOG_MESSAGES = {
    "lightning.pytorch.utilities.rank_zero": ("litlogger", "litmodels"),
    "lightning.pytorch.trainer.connectors.checkpoint_connector": ("`weights_only` was not set",),
    "diffusers.models.modeling_utils": ("`accelerate` was not found", "should be kept in float32: []."),
}


class _Drop(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def quiet() -> None:
    """Installs the filters (idempotent)."""
    for message in WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name, fragments in LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(fragments))
