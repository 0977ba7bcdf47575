"""Random numbers a resumed or distributed run draws exactly as one uninterrupted process would: the global RNG
states (torch, CUDA, numpy, python) as checkpointable values, and GlobalNoise, the losses' t and eps."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch
from torch import Tensor


def rng_states() -> dict:
    """torch, CUDA, numpy and python RNG states, as tensors and plain types (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],  # this rank's device
            "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": random.getstate()}


def stream_seed(stream: str, seed: int, index: int = 0) -> int:
    """The torch generator seed of item `index` of the evaluation stream `stream` ("eval": validation and prediction
    noise, "steps": a multi-step generator's noise between steps) under `seed`: a 64-bit hash with the top bit set.
    Training batches (data.stream.GlobalBatchStream) and pairs (data.format.item_noise) take seed * 2**32 + index,
    below 2**63: no validation or report noise is ever a training or regression input."""
    digest = hashlib.blake2b(f"{stream}/{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") | 1 << 63


def rank_world(obj) -> tuple[int, int]:
    """(global rank, world size) of the trainer a LightningModule or LightningDataModule is attached to, (0, 1)
    without one."""
    trainer = obj._trainer if hasattr(obj, "_trainer") else getattr(obj, "trainer", None)
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


def batch_seed(module, batch_idx: int) -> int:
    """The global index of this rank's evaluation batch `batch_idx` (Lightning's DistributedSampler deals batch
    b * world_size + rank to each rank as its b-th)."""
    rank, world = rank_world(module)
    return batch_idx * world + rank


def steps_seed(module, batch: dict, batch_idx: int) -> tuple[int, int]:
    """(seed, index) of a multi-step generator's noise between steps for evaluation batch `batch_idx`: the data's
    evaluation seed (the batch's "seed", 0 without one) and the batch's global index (`batch_seed`), so that the
    validation and report seeds differ in that noise too, and a batch gives the same images on any number of ranks."""
    seed = batch.get("seed", 0)
    return int(seed), batch_seed(module, batch_idx)


def repeated_batch(module, batch_idx: int) -> bool:
    """Whether this rank's validation or test batch `batch_idx` repeats an earlier one: DistributedSampler gives
    every rank as many batches by dealing the first batches again past the end (global index >= their count).
    Repeats still reach validation_step (every rank takes as many steps) but are not scored, so N ranks score the
    samples of one process."""
    if rank_world(module)[1] == 1:
        return False
    trainer = module.trainer
    loader = trainer.test_dataloaders if trainer.testing else trainer.val_dataloaders
    if not hasattr(getattr(loader, "dataset", None), "__len__"):
        return False  # loaders this module did not make (several, or iterable: no padding)
    return batch_seed(module, batch_idx) >= len(loader.dataset)


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():  # onto this rank's device; older checkpoints: one per device
        cuda = states["cuda"]
        torch.cuda.set_rng_state(cuda[min(torch.cuda.current_device(), len(cuda) - 1)])
    keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


class GlobalNoise:
    """The losses' t ~ U[t_range * T] and eps ~ N(0, I), drawn from one generator for the global batch of all
    ranks, each rank keeping its slice: a DDP run draws what one process with the global batch would.
    The generator is seeded by `torch.initial_seed()` on the first draw; `state` / `load` checkpoint it."""

    def __init__(self):
        self.generator: torch.Generator | None = None
        self._mark: Tensor | None = None

    def draw(self, x: Tensor, schedule, t_range: tuple[float, float], part: int = 0,
             parts: int = 1) -> tuple[Tensor, Tensor]:
        """t (B,) and eps like x (B, ...) for this part's B samples of a draw for `parts` x B: part = rank of a
        world of `parts` ranks (or, with gradient accumulation, micro-batch x world + rank, with `rewind` between
        micro-batches), so the parts together are what one process with the whole batch draws."""
        g, n = self._on(x.device), x.shape[0]
        t = schedule.sample_t(n * parts, *t_range, device=x.device, generator=g)
        eps = torch.randn((n * parts, *x.shape[1:]), device=x.device, generator=g)
        return t[part * n:(part + 1) * n], eps[part * n:(part + 1) * n]

    def mark(self) -> None:
        """Remembers the generator's state; `rewind` returns to it (the next micro-batch of an update draws again
        what the first one drew, and keeps its own part)."""
        self._mark = self.state()

    def rewind(self) -> None:
        self.generator = None if self._mark is None else self._with_state(self._mark, self.generator.device)

    @staticmethod
    def draw_index(n: int, key: int) -> int:
        """An index in [0, n) for `key` (an update's number): the same on every rank, micro-batch and resumed run,
        drawn on the host from the run's seed and the key, so that it needs no device synchronisation."""
        return random.Random(torch.initial_seed() * 1_000_003 + key).randrange(n)

    def _on(self, device: torch.device) -> torch.Generator:
        """The generator, created on `device` (seeded by torch.initial_seed()) on first use or a device move."""
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device).manual_seed(torch.initial_seed())
        return self.generator

    def state(self) -> Tensor | None:
        return self.generator.get_state() if self.generator is not None else None

    def load(self, state: Tensor, device: torch.device) -> None:
        self.generator = self._with_state(state, device)

    @staticmethod
    def _with_state(state: Tensor, device: torch.device) -> torch.Generator:
        g = torch.Generator(device=device)
        g.set_state(state)
        return g
