"""Generating the noise-image regression pairs of DMD (Yin et al. 2024, Sec. 3.3) with Lightning's predict loop.

`dmd pairs --config configs/fmnist_pairs.yaml` runs the teacher's deterministic ODE sampler on seeded noise:
PairGenerationDataModule serves the shards not yet on disk (shard s to rank s % world_size), PairGenerator
samples, PairWriter stores each finished shard atomically. Rerunning after an interruption only makes the
missing shards (and those whose checksums fail), and the noise of pair i never depends on ranks or batching.
Read the result with PairDataset.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Literal

import torch
from lightning import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from dmd_lightning.checks import check_sample_shape
from dmd_lightning.data.format import (
    MANIFEST,
    PairsError,
    item_label,
    item_noise,
    num_shards,
    read_manifest,
    same_setting,
    shard_name,
    shard_problem,
    shard_range,
    write_manifest,
    write_shard,
    writer_is_gone,
)
from dmd_lightning.denoisers import Denoiser
from dmd_lightning.errors import check_int
from dmd_lightning.loading import DTYPES
from dmd_lightning.rng import rank_world
from dmd_lightning.samplers import make_scheduler, sample_ode


def teacher_identity(teacher: Denoiser) -> str:
    """The weights' path for pretrained teachers, else the class name: what `expect` compares."""
    return str(getattr(teacher, "path", None) or type(teacher).__name__)


class PairGenerator(LightningModule):
    """predict_step: a batch of seeded noise -> the teacher's deterministic ODE sample from it."""

    def __init__(self, teacher: Denoiser, sampler: str = "ddim", num_steps: int = 50, guidance_scale: float = 1.0):
        super().__init__()
        self.save_hyperparameters(ignore=["teacher"])
        self.teacher = teacher.requires_grad_(False).eval()
        make_scheduler(sampler, teacher.schedule.config)  # an unknown sampler fails here, not after loading data

    @property
    def settings(self) -> dict:
        """What made the pairs; stored in the manifest and every shard, checked by PairDataset(expect=...)."""
        hp = self.hparams
        return {"teacher": teacher_identity(self.teacher), "sampler": hp.sampler, "num_steps": hp.num_steps,
                "guidance_scale": hp.guidance_scale}

    def predict_step(self, batch: dict, batch_idx: int = 0) -> dict[str, Tensor]:
        hp = self.hparams
        # A fresh scheduler per batch: multistep schedulers (pndm, dpmsolver++) keep state between steps.
        scheduler = make_scheduler(hp.sampler, self.teacher.schedule.config)
        x = sample_ode(self.teacher, batch["noise"], scheduler, hp.num_steps, batch.get("cond"), hp.guidance_scale)
        return {**batch, "x": x}


def make_batch(indices: range, seed: int, noise_shape: list[int], num_classes: int | None) -> dict[str, Tensor]:
    """index (B,), noise (B, *noise_shape) and, with classes, cond (B,) for the pairs in `indices`."""
    batch = {"index": torch.arange(indices.start, indices.stop),
             "noise": torch.stack([item_noise(seed, i, noise_shape) for i in indices])}
    if num_classes:
        batch["cond"] = torch.tensor([item_label(i, num_classes) for i in indices])
    return batch


class ShardBatches(IterableDataset):
    """Whole batches of the given shards, in order; a batch never straddles two shards."""

    def __init__(self, shards: list[int], num_pairs: int, shard_size: int, batch_size: int, make):
        self.ranges = [range(start, min(start + batch_size, r.stop))
                       for s in shards for r in [shard_range(s, num_pairs, shard_size)]
                       for start in range(r.start, r.stop, batch_size)]
        self.make = make

    def __len__(self) -> int:
        return len(self.ranges)

    def __iter__(self) -> Iterator[dict]:
        return (self.make(r) for r in self.ranges)


class PairGenerationDataModule(LightningDataModule):
    """Seeded noise (and balanced class labels) for pairs 0..num_pairs-1, in shards of `shard_size`.

    Only unfinished shards are served, shard s to rank s % world_size. `num_classes: null` for unconditional
    teachers. The noise of pair i comes from a generator seeded by (seed, i). `dtype` is the storage dtype of
    noise and images that `dmd pairs` hands to its PairWriter.
    """

    def __init__(self, out_dir: str, num_pairs: int, shard_size: int = 1000, noise_shape: list[int] = [1, 32, 32],
                 num_classes: int | None = 10, batch_size: int = 250, seed: int = 0,
                 dtype: Literal["float32", "float16", "bfloat16"] = "float32"):
        super().__init__()
        for key in ("num_pairs", "shard_size", "batch_size"):
            check_int(key, locals()[key])
        check_int("seed", seed, 0)
        self.save_hyperparameters()
        self.out_dir = Path(out_dir)
        self.num_pairs, self.shard_size, self.batch_size, self.seed = num_pairs, shard_size, batch_size, seed
        self.noise_shape, self.num_classes, self.dtype = list(noise_shape), num_classes, dtype
        # After a resume some ranks may have nothing left to do.
        self.allow_zero_length_dataloader_with_multiple_devices = True

    @property
    def num_shards(self) -> int:
        return num_shards(self.num_pairs, self.shard_size)

    def layout(self) -> dict:
        """The manifest's description of the pair set (the sampler settings come from the model)."""
        return {"num_pairs": self.num_pairs, "shard_size": self.shard_size, "num_shards": self.num_shards,
                "noise_shape": self.noise_shape, "num_classes": self.num_classes, "seed": self.seed}

    def pending_shards(self) -> list[int]:
        """This rank's shards whose file is absent or fails to load or verify; one line says why for each file
        that exists but is regenerated."""
        rank, world = rank_world(self)
        pending = []
        for s in range(rank, self.num_shards, world):
            path = self.out_dir / shard_name(s)
            why = shard_problem(path, shard_range(s, self.num_pairs, self.shard_size))
            if why is not None:
                pending.append(s)
                if why != "missing":
                    print(f"{path.name}: {why}; regenerating")
        return pending

    def predict_dataloader(self) -> DataLoader:
        def make(indices: range) -> dict[str, Tensor]:
            return make_batch(indices, self.seed, self.noise_shape, self.num_classes)

        batches = ShardBatches(self.pending_shards(), self.num_pairs, self.shard_size, self.batch_size, make)
        return DataLoader(batches, batch_size=None)


class PairWriter(BasePredictionWriter):
    """Collects each shard's predictions and writes it as `shard-XXXXX.safetensors` once complete.

    Rank 0 writes `manifest.json` in `setup`; a folder whose manifest names other settings is refused, so
    pairs of two teachers or samplers never mix. `dtype` (float32, float16, bfloat16) is the storage dtype of
    noise and x.
    """

    def __init__(self, out_dir: str, dtype: str = "float32"):
        super().__init__(write_interval="batch")
        if dtype not in DTYPES:
            raise ValueError(f"unknown storage dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        self.out_dir, self.dtype = Path(out_dir), dtype
        self.pending: dict[int, list[dict[str, Tensor]]] = {}

    def manifest(self, trainer, pl_module) -> dict:
        dm = trainer.datamodule
        if not isinstance(dm, PairGenerationDataModule) or not isinstance(pl_module, PairGenerator):
            raise TypeError("PairWriter needs a PairGenerator model and a PairGenerationDataModule")
        return json.loads(json.dumps({**dm.layout(), **pl_module.settings, "dtype": self.dtype}))

    def setup(self, trainer, pl_module, stage: str) -> None:
        # setup, not on_predict_start: the check must run even when every shard is done and predict is skipped.
        manifest = self.manifest(trainer, pl_module)
        check_sample_shape(pl_module.teacher, tuple(manifest["noise_shape"]))  # before any file is written
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.pending = {}
        if (self.out_dir / MANIFEST).is_file():
            old = read_manifest(self.out_dir)
            diff = {k: (old.get(k), v) for k, v in manifest.items() if not same_setting(k, old.get(k), v)}
            if diff:
                listed = ", ".join(f"{k}: {a!r} on disk vs {b!r} now" for k, (a, b) in diff.items())
                raise PairsError(f"{self.out_dir / MANIFEST} was written with other settings ({listed}); "
                                 "use another out_dir or delete the folder")
        elif trainer.is_global_zero:
            write_manifest(self.out_dir, manifest)
        self.remove_stale_files(trainer.global_rank, trainer.world_size)

    def remove_stale_files(self, rank: int, world: int) -> None:
        """Delete the temporary files a killed run left behind: of this rank's shards only (no other rank of this
        run writes them), and only if their writer is gone (another live run may be writing one)."""
        for tmp in self.out_dir.glob(".shard-*.safetensors.tmp-*"):
            shard = tmp.name.split(".")[1].removeprefix("shard-")
            if shard.isdigit() and int(shard) % world == rank and writer_is_gone(tmp):
                tmp.unlink(missing_ok=True)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        dm = trainer.datamodule
        item = {k: v.detach().cpu() for k, v in prediction.items()}
        s = int(item["index"][0]) // dm.shard_size
        self.pending.setdefault(s, []).append(item)
        indices = shard_range(s, dm.num_pairs, dm.shard_size)
        if sum(len(p["index"]) for p in self.pending[s]) < len(indices):
            return
        parts = self.pending.pop(s)
        tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        for k in ("noise", "x"):
            tensors[k] = tensors[k].to(DTYPES[self.dtype])
        write_shard(self.out_dir / shard_name(s), tensors, pl_module.settings)
