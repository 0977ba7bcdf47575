"""DMDDataModule: each training step, a regression batch of teacher pairs and a DM batch of fresh noise."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from lightning import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from dmd_lightning.data.format import PairDataset, PairsError
from dmd_lightning.errors import ConfigError, check_int
from dmd_lightning.rng import rank_world, stream_seed


class GlobalBatchStream(IterableDataset):
    """Endless training batches, sharded by rank as slices of one global stream.

    Global batch k comes from a generator seeded by (seed, k); `make(g, world_size)` draws it at world_size
    times the per-device sizes and this rank serves slice `rank` of every tensor. So a DDP run sees exactly
    the batches of a single process with world_size x the batch, and batch k never depends on what came
    before: a resumed run starts at `start()`, the datamodule's count of consumed batches.
    """

    def __init__(self, make: Callable[[torch.Generator, int], dict[str, Tensor]], seed: int, rank: int, world: int,
                 start: Callable[[], int]):
        if not 0 <= seed < 2**31:
            raise ConfigError(f"need 0 <= seed < 2**31, got {seed}")
        self.make, self.seed, self.rank, self.world, self.start = make, seed, rank, world, start

    def global_batch(self, k: int) -> dict[str, Tensor]:
        return self.make(torch.Generator().manual_seed(self.seed * 2**32 + k), self.world)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        k = self.start()
        while True:
            yield {key: v.chunk(self.world)[self.rank] for key, v in self.global_batch(k).items()}
            k += 1


class StreamDataModule(LightningDataModule):
    """A datamodule whose training data is a GlobalBatchStream; `position` (training batches consumed) is
    checkpointed. It is counted when a batch reaches training_step, not when the loader yields it: Lightning
    fetches one batch ahead, so the loader's own count would resume one batch too far."""

    position: int = 0

    def stream_loader(self, make: Callable[[torch.Generator, int], dict[str, Tensor]], seed: int) -> DataLoader:
        """The stream of this rank's slices; pinned on a CUDA machine, so that Lightning's non-blocking copy to the
        device overlaps the step in progress."""
        rank, world = rank_world(self)
        return DataLoader(GlobalBatchStream(make, seed, rank, world, lambda: self.position), batch_size=None,
                          pin_memory=torch.cuda.is_available())

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training:
            self.position += 1
        return batch

    def layout(self) -> dict:
        """What batch k of the stream depends on: the seed and the global batch sizes (per device x world size)."""
        _, world = rank_world(self)
        sizes = {k: v * world for k, v in self.hparams.items() if k.endswith("batch_size") and not k.startswith("val")}
        return {"seed": self.hparams.get("seed"), **sizes}

    def state_dict(self) -> dict:
        return {"position": self.position, "layout": self.layout()}

    def load_state_dict(self, state: dict) -> None:
        """The position; a warning when the seed or a global batch size changed since (other devices or batch
        sizes): the run goes on, but not on the uninterrupted run's batches. The same global batch on another
        number of devices continues exactly."""
        self.position = int(state.get("position", 0))
        saved, now = state.get("layout"), self.layout()
        if saved is not None and saved != now:
            changed = ", ".join(f"{k} {saved.get(k)} -> {now.get(k)}" for k in sorted({*saved, *now})
                                if saved.get(k) != now.get(k))
            rank_zero_warn(f"resuming with other data settings than the checkpoint's (global {changed}): training "
                           "continues, on other batches than the uninterrupted run's")


class RealImages:
    """Real training images for DMD2's GAN: `images` (N, C, H, W) in the model's space and `labels` (N,) or None.
    A data set provides a subclass (fmnist.data.FashionMNISTImages)."""

    images: Tensor
    labels: Tensor | None = None


class DMDDataModule(StreamDataModule):
    """Serves {z, cond, pair_z, pair_x, pair_cond, real_x, real_cond} for training, fixed {z, cond} for validation.

    `pairs_dir` holds DMD's regression pairs (null without a regression loss); `real_images` (DMD2) adds a batch of
    `batch_size` real images (and labels) per device and step, drawn uniformly with replacement from the same
    seeded global stream, so that resume and DDP see exactly the batches of one uninterrupted process.
    Conditions of the DM batch are drawn with the label frequencies of the pairs (else of the real images);
    `expect` (e.g. {"teacher": ..., "sampler": "ddim", "num_steps": 50}) is checked against the
    settings that made the pairs. `batch_size` and `pair_batch_size` are per device; pairs are drawn uniformly
    with replacement. Validation noise comes from `val_seed` (default `seed + 1`): choose settings on one
    val_seed and report on another, so that the reported figure's samples were never looked at while tuning.
    """

    def __init__(self, pairs_dir: str | None, batch_size: int = 64, pair_batch_size: int = 64,
                 num_classes: int | None = 10, val_size: int = 10000, val_batch_size: int = 500, seed: int = 0,
                 val_seed: int | None = None, expect: dict | None = None, real_images: RealImages | None = None):
        super().__init__()
        if pairs_dir is None and real_images is None:
            raise ConfigError("pairs_dir=None: give regression pairs (pairs_dir), real images (real_images) or both")
        for key in ("batch_size", "pair_batch_size", "val_size", "val_batch_size"):
            check_int(key, locals()[key])
        check_int("num_classes", num_classes, allow_none=True)
        check_int("seed", seed, 0)
        check_int("val_seed", val_seed, 0, allow_none=True)
        self.save_hyperparameters(ignore=["real_images"])
        self.num_classes = num_classes
        self.real = real_images
        self.pairs: PairDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.real is not None:
            labels = self.real.labels
            if (labels is None) != (self.hparams.num_classes is None) or (
                    labels is not None and int(labels.max()) >= self.hparams.num_classes):
                raise ConfigError(f"num_classes={self.hparams.num_classes} does not fit the real images' labels")
        if self.pairs is None and self.hparams.pairs_dir is not None:
            self.pairs = PairDataset(self.hparams.pairs_dir, expect=self.hparams.expect)
            if (self.pairs.cond is None) != (self.hparams.num_classes is None):
                raise PairsError(f"pairs in {self.hparams.pairs_dir} are {'un' if self.pairs.cond is None else ''}"
                                 f"conditional but num_classes is {self.hparams.num_classes}")
            if self.pairs.cond is not None and int(self.pairs.cond.max()) >= self.hparams.num_classes:
                raise PairsError(f"pairs in {self.hparams.pairs_dir} have labels up to {int(self.pairs.cond.max())} "
                                 f"but num_classes is {self.hparams.num_classes}")

    @property
    def sample_shape(self) -> tuple[int, ...] | None:
        """Shape of one sample (C, H, W), which the model checks against its teacher."""
        if self.pairs is not None:
            return tuple(self.pairs.noise.shape[1:])
        return tuple(self.real.images.shape[1:]) if self.real is not None else None

    def label_probs(self) -> Tensor | None:
        if self.hparams.num_classes is None:
            return None
        labels = self.pairs.cond if self.pairs is not None else self.real.labels
        counts = torch.bincount(labels.long(), minlength=self.hparams.num_classes).float()
        return counts / counts.sum()

    def train_batch(self, g: torch.Generator, world: int) -> dict[str, Tensor]:
        """A global batch for `world` devices: DM noise and conditions, regression pairs, real images."""
        n, m = self.hparams.batch_size * world, self.hparams.pair_batch_size * world
        out = {"z": torch.randn(n, *self.sample_shape, generator=g)}
        probs = self.label_probs()
        if probs is not None:
            out["cond"] = torch.multinomial(probs, n, replacement=True, generator=g)
        if self.pairs is not None:
            idx = torch.randint(0, len(self.pairs), (m,), generator=g)
            out["pair_z"], out["pair_x"] = self.pairs.noise[idx].float(), self.pairs.x[idx].float()
            if self.pairs.cond is not None:
                out["pair_cond"] = self.pairs.cond[idx]
        if self.real is not None:
            idx = torch.randint(0, len(self.real.images), (n,), generator=g)
            out["real_x"] = self.real.images[idx].float()
            if self.real.labels is not None:
                out["real_cond"] = self.real.labels[idx]
        return out

    def train_dataloader(self) -> DataLoader:
        return self.stream_loader(self.train_batch, self.hparams.seed)

    def val_batches(self) -> list[dict[str, Tensor]]:
        """Fixed seeded noise and balanced labels; the same for every validation and for `dmd predict`."""
        hp = self.hparams
        seed = hp.seed + 1 if hp.val_seed is None else hp.val_seed
        return noise_batches(self.sample_shape, hp.val_size, hp.val_batch_size, hp.num_classes, seed)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_batches(), batch_size=None)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader


def noise_batches(shape: tuple[int, ...], size: int, batch_size: int, num_classes: int | None,
                  seed: int) -> list[dict[str, Tensor]]:
    """`size` noise samples of `shape` drawn from `seed`'s evaluation stream (rng.stream_seed: never a training
    batch's or a pair's noise), in batches {z, cond, seed, index}, with labels i % num_classes; `seed` (a 0-d tensor)
    also seeds a multi-step generator's noise between steps (rng.steps_seed); `index`: each sample's i."""
    z = torch.randn(size, *shape, generator=torch.Generator().manual_seed(stream_seed("eval", seed)))
    out = []
    for start in range(0, size, batch_size):
        index = torch.arange(start, min(start + batch_size, size))
        b = {"z": z[start:start + batch_size], "seed": torch.tensor(seed), "index": index}
        if num_classes is not None:
            b["cond"] = index % num_classes
        out.append(b)
    return out


class NoiseDataModule(LightningDataModule):
    """Fixed seeded {z, cond} for `dmd predict` of a model that needs no data (export.pretrained.ExportedGenerator),
    of the model's `sample_shape` and `num_classes`: with seed = a DMDDataModule's val_seed (default: its seed + 1)
    and the same sizes, the very batches that it validates and predicts on."""

    def __init__(self, num_samples: int = 10000, batch_size: int = 500, seed: int = 1):
        super().__init__()
        check_int("num_samples", num_samples)
        check_int("batch_size", batch_size)
        check_int("seed", seed, 0)
        self.save_hyperparameters()

    def predict_dataloader(self) -> DataLoader:
        model, hp = self.trainer.lightning_module, self.hparams
        batches = noise_batches(tuple(model.sample_shape), hp.num_samples, hp.batch_size, model.num_classes, hp.seed)
        return DataLoader(batches, batch_size=None)
