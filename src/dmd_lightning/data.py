"""DMDDataModule: each training step, a regression batch of teacher pairs and a DM batch of fresh noise."""

from __future__ import annotations

from typing import Iterator

import torch
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from .pair_data import PairDataset, PairsError


class _TrainStream(IterableDataset):
    """Endless batches from one seeded generator (seed + rank): DM noise and conditions, and pairs drawn
    uniformly with replacement. `position` counts the batches served so a resumed run continues the stream."""

    def __init__(self, pairs: PairDataset, batch_size: int, pair_batch_size: int, label_probs: Tensor | None,
                 seed: int):
        self.pairs, self.batch_size, self.pair_batch_size = pairs, batch_size, pair_batch_size
        self.label_probs, self.seed, self.position = label_probs, seed, 0

    def batch(self, g: torch.Generator) -> dict[str, Tensor]:
        shape = self.pairs.noise.shape[1:]
        out = {"z": torch.randn(self.batch_size, *shape, generator=g)}
        if self.label_probs is not None:
            out["cond"] = torch.multinomial(self.label_probs, self.batch_size, replacement=True, generator=g)
        idx = torch.randint(0, len(self.pairs), (self.pair_batch_size,), generator=g)
        out["pair_z"], out["pair_x"] = self.pairs.noise[idx].float(), self.pairs.x[idx].float()
        if self.pairs.cond is not None:
            out["pair_cond"] = self.pairs.cond[idx]
        return out

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.position):  # replay the generator up to the saved position
            self.batch(g)
        while True:
            self.position += 1
            yield self.batch(g)


class DMDDataModule(LightningDataModule):
    """Serves {z, cond, pair_z, pair_x, pair_cond} for training and fixed {z, cond} for validation.

    Conditions of the DM batch are drawn with the label frequencies of the pairs (which follow the data's
    labels); `expect` (e.g. {"teacher": ..., "sampler": "ddim", "num_steps": 50}) is checked against the
    settings that made the pairs. `batch_size` and `pair_batch_size` are per device.
    """

    def __init__(self, pairs_dir: str, batch_size: int = 64, pair_batch_size: int = 64,
                 num_classes: int | None = 10, val_size: int = 10000, val_batch_size: int = 500, seed: int = 0,
                 expect: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.pairs: PairDataset | None = None
        self.stream: _TrainStream | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.pairs is None:
            self.pairs = PairDataset(self.hparams.pairs_dir, expect=self.hparams.expect)
            if (self.pairs.cond is None) != (self.hparams.num_classes is None):
                raise PairsError(f"pairs in {self.hparams.pairs_dir} are {'un' if self.pairs.cond is None else ''}"
                                 f"conditional but num_classes is {self.hparams.num_classes}")

    def label_probs(self) -> Tensor | None:
        if self.hparams.num_classes is None:
            return None
        counts = torch.bincount(self.pairs.cond.long(), minlength=self.hparams.num_classes).float()
        return counts / counts.sum()

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        if self.stream is None:
            self.stream = _TrainStream(self.pairs, self.hparams.batch_size, self.hparams.pair_batch_size,
                                       self.label_probs(), self.hparams.seed + 1000 * rank)
        return DataLoader(self.stream, batch_size=None)

    def val_batches(self) -> list[dict[str, Tensor]]:
        """Fixed seeded noise and balanced labels; the same for every validation and for `dmd predict`."""
        hp = self.hparams
        g = torch.Generator().manual_seed(hp.seed + 1)
        z = torch.randn(hp.val_size, *self.pairs.noise.shape[1:], generator=g)
        out = []
        for start in range(0, hp.val_size, hp.val_batch_size):
            b = {"z": z[start:start + hp.val_batch_size]}
            if hp.num_classes is not None:
                b["cond"] = torch.arange(start, start + len(b["z"])) % hp.num_classes
            out.append(b)
        return out

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_batches(), batch_size=None)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader

    def state_dict(self) -> dict:
        return {"position": self.stream.position if self.stream is not None else 0}

    def load_state_dict(self, state: dict) -> None:
        self.setup()
        self.train_dataloader()
        self.stream.position = int(state.get("position", 0))
