"""Data for Stable Diffusion: prompt files, latent regression pairs (`dmd pairs`), and DMD's training batches.

A latent pair folder has data/format.py's layout (manifest.json, shards of `index`, `noise`, `x` (float16 latents))
plus `prompt_index` (n,) per shard and `prompts.json`, the prompt list it indexes: prompt embeddings are not
stored with the pairs but recomputed once (PromptEmbeddings' cache) from the prompts.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dmd_lightning.data.format import PairDataset, PairsError, atomic_write_bytes
from dmd_lightning.data.generation import PairGenerationDataModule, PairGenerator, ShardBatches, make_batch
from dmd_lightning.data.stream import StreamDataModule
from dmd_lightning.errors import ConfigError
from dmd_lightning.rng import rank_world, stream_seed
from dmd_lightning.sd.model import PromptEmbeddings, load_text_encoder, tokenize
from dmd_lightning.sd.real import RealLatents, caption_text

PROMPTS = "prompts.json"
PROMPT_COLUMNS = ("prompt", "caption", "text")


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a .txt (one per line, blank lines skipped), .csv or .parquet file (column prompt, caption or
    text); .parquet needs pyarrow. ConfigError when it holds none."""
    prompts = _read_prompts(Path(path))
    if not prompts:
        raise ConfigError(f"prompt file {path} holds no prompts")
    return prompts


def _read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} not found")
    if path.suffix == ".txt":
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        columns = list(rows[0]) if rows else []
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow); or save the prompts as .txt "
                              "(one per line) or .csv") from None
        table = pq.read_table(path)
        columns, rows = table.column_names, table.to_pylist()
    else:
        raise ConfigError(f"unknown prompt file type {path.suffix!r} ({path}); expected .txt, .csv or .parquet")
    column = next((c for c in PROMPT_COLUMNS if c in columns), None)
    if column is None:
        raise ConfigError(f"{path} has no prompt column: expected one of {PROMPT_COLUMNS}, found {columns}")
    return [caption_text(r[column]) for r in rows]


def prompts_digest(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]



def device_of(datamodule) -> torch.device | str:
    """Where the attached trainer computes (the text encoder and VAE run there), the CPU without a trainer."""
    return datamodule.trainer.strategy.root_device if datamodule.trainer is not None else "cpu"


class TextPairGenerator(PairGenerator):
    """PairGenerator for text-to-image teachers: defaults of the DMD paper's SD pairs (PNDM, 50 steps, guidance
    3). Prompt embeddings arrive as `cond` and are dropped from what is stored (`prompt_index` is kept)."""

    def __init__(self, teacher, sampler: str = "pndm", num_steps: int = 50, guidance_scale: float = 3.0):
        super().__init__(teacher, sampler, num_steps, guidance_scale)

    def predict_step(self, batch: dict, batch_idx: int = 0) -> dict[str, Tensor]:
        out = super().predict_step(batch, batch_idx)
        out.pop("cond", None)
        return out


class LatentPairGenerationDataModule(PairGenerationDataModule):
    """Seeded latent noise (4, resolution/8, resolution/8) and the cached embedding of each pair's prompt.

    Pair i gets prompt `perm[i % N]` of the N prompts (perm a seeded permutation, so any num_pairs samples the
    prompt file evenly). The prompts are saved as prompts.json in out_dir and their digest in the manifest.
    """

    def __init__(self, out_dir: str, prompts: str, text_encoder: str, num_pairs: int, shard_size: int = 1000,
                 resolution: int = 512, latent_channels: int = 4, batch_size: int = 32, seed: int = 0,
                 dtype: Literal["float32", "float16", "bfloat16"] = "float16",
                 embedding_cache: str = "runs/prompt_cache"):
        super().__init__(out_dir, num_pairs, shard_size, [latent_channels, resolution // 8, resolution // 8],
                         None, batch_size, seed, dtype)
        self.prompts_file, self.text_encoder = prompts, text_encoder
        self.embedder = PromptEmbeddings(text_encoder, embedding_cache)
        self._prompts: list[str] | None = None
        self.embeddings: Tensor | None = None

    @property
    def prompts(self) -> list[str]:
        if self._prompts is None:
            self._prompts = read_prompts(self.prompts_file)
        return self._prompts

    def prompt_index(self, index: Tensor) -> Tensor:
        perm = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.seed))
        return perm[index % len(self.prompts)]

    def layout(self) -> dict:
        return {**super().layout(), "num_prompts": len(self.prompts), "prompts_sha256": prompts_digest(self.prompts),
                "text_encoder": self.text_encoder}

    def prepare_data(self) -> None:
        self.embedder.build(self.prompts, device_of(self))  # once per node; setup() then only reads the file

    def setup(self, stage: str | None = None) -> None:
        path = self.out_dir / PROMPTS
        if path.is_file():
            if json.loads(path.read_text()) != self.prompts:
                raise PairsError(f"{path} lists other prompts than {self.prompts_file}; use another out_dir")
        elif rank_world(self)[0] == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, json.dumps(self.prompts).encode())
        self.embeddings = self.embedder.load(self.prompts, device_of(self))

    def predict_dataloader(self) -> DataLoader:
        def make(indices: range) -> dict[str, Tensor]:
            batch = make_batch(indices, self.seed, self.noise_shape, None)
            batch["prompt_index"] = self.prompt_index(batch["index"])
            batch["cond"] = self.embeddings[batch["prompt_index"]].float()
            return batch

        batches = ShardBatches(self.pending_shards(), self.num_pairs, self.shard_size, self.batch_size, make)
        return DataLoader(batches, batch_size=None)


class LatentPairDataset(PairDataset):
    """A latent pair folder: PairDataset's tensors plus `prompt_index` (n,) and `prompts`, the list it indexes."""

    def __init__(self, folder: str | Path, expect: dict | None = None):
        super().__init__(folder, expect)
        path = self.folder / PROMPTS
        if not path.is_file():
            raise PairsError(f"{path} is missing: {self.folder} is not a text-to-image pair folder")
        self.prompts = json.loads(path.read_text())
        if "prompt_index" not in self.columns:
            raise PairsError(f"the shards of {self.folder} hold no prompt_index: not a text-to-image pair folder")
        self.prompt_index = self.columns["prompt_index"]


class _ValBatches(Dataset):
    """Batch k of the fixed validation set: noise seeded per item (rng.stream_seed), the embeddings and texts of its
    prompts, the seed (for a multi-step generator's noise between steps, rng.steps_seed) and the items' indices."""

    def __init__(self, prompts: list[str], embeddings: Tensor, shape: list[int], size: int, batch_size: int,
                 seed: int):
        self.prompts, self.embeddings, self.shape = prompts, embeddings, list(shape)
        self.size, self.batch_size, self.seed = size, batch_size, seed

    def __len__(self) -> int:
        return -(-self.size // self.batch_size)

    def __getitem__(self, k: int) -> dict:
        items = range(k * self.batch_size, min((k + 1) * self.batch_size, self.size))
        index = torch.tensor(list(items)) % len(self.prompts)
        return {"z": torch.stack([torch.randn(self.shape, generator=torch.Generator().manual_seed(
                     stream_seed("eval", self.seed, i))) for i in items]),
                "cond": self.embeddings[index].float(), "prompt_index": index, "seed": torch.tensor(self.seed),
                "index": torch.tensor(list(items)),
                "prompt": [self.prompts[i] for i in index.tolist()]}


class SDDMDDataModule(StreamDataModule):
    """Training batches {z, cond, pair_z, pair_x, pair_cond, real_x, real_cond} for DMD and DMD2 on a latent
    teacher, validation batches {z, cond, prompt_index, prompt}.

    The DM batch is fresh latent noise with prompts drawn uniformly from `prompts`; the regression batch is
    drawn from the latent pairs of `pairs_dir` with their own prompts' embeddings (none with `pairs_dir: null`,
    for DMD2 without regression; the latents then have `latent_shape`). `real_images` (DMD2's GAN) adds
    `batch_size` real latents per device with their captions' embeddings, drawn uniformly with replacement (as the
    official code's real loader, at the DM batch size). All are drawn from one seeded global stream, so resume and
    DDP see the batches of one uninterrupted process. Validation uses the first `val_size` prompts of
    `val_prompts` (default: `prompts`), in order, e.g. COCO-30k captions. The real latents come from their cache
    (built in prepare_data, memory-mapped in setup). Prompt embeddings, with `embed="cache"`, come from
    PromptEmbeddings' cache: 118 KB per SD1.5 prompt, fine for tens of thousands of prompts; with
    `embed="device"` the training batches carry token ids (`cond_ids`, `pair_cond_ids`, `real_cond_ids`) instead,
    which the frozen text encoder turns into `cond`, ... on the training device after the transfer: for millions
    of prompts or captions, as the official DMD2 code encodes them. Validation prompts are cached either way.
    Sizes are per device.
    """

    def __init__(self, pairs_dir: str | None, prompts: str, text_encoder: str, embedding_cache: str = "runs/prompt_cache",
                 batch_size: int = 8, pair_batch_size: int = 8, val_prompts: str | None = None, val_size: int = 1000,
                 val_batch_size: int = 16, seed: int = 0, expect: dict | None = None,
                 latent_shape: list[int] = [4, 64, 64], real_images: RealLatents | None = None,
                 embed: Literal["cache", "device"] = "cache"):
        super().__init__()
        self.save_hyperparameters(ignore=["real_images"])
        self.embedder = PromptEmbeddings(text_encoder, embedding_cache)
        self.pairs: LatentPairDataset | None = None
        self.real = real_images
        self.tokenizer = self.text_encoder = None  # embed="device": loaded with the first training batch

    def prompt_lists(self) -> dict[str, list[str]]:
        hp = self.hparams
        return {"train": read_prompts(hp.prompts), "val": read_prompts(hp.val_prompts or hp.prompts),
                "pairs": json.loads((Path(hp.pairs_dir) / PROMPTS).read_text())
                if hp.pairs_dir is not None and (Path(hp.pairs_dir) / PROMPTS).is_file() else [],
                "real": self.real.load(device_of(self)).captions if self.real is not None else []}

    def _cached(self, lists: dict[str, list[str]]) -> dict[str, list[str]]:
        """The prompt lists whose embeddings are cached: all, or with embed="device" the validation prompts."""
        return lists if self.hparams.embed == "cache" else {"val": lists["val"]}

    def prepare_data(self) -> None:
        for prompts in self._cached(self.prompt_lists()).values():
            if prompts:
                self.embedder.build(prompts, device_of(self))

    def setup(self, stage: str | None = None) -> None:
        if self.pairs is not None or getattr(self, "val_prompts", None) is not None:
            return
        lists = self.prompt_lists()
        if self.hparams.pairs_dir is not None:
            self.pairs = LatentPairDataset(self.hparams.pairs_dir, expect=self.hparams.expect)
        self.val_prompts = lists["val"]
        self.embeddings = {k: self.embedder.load(v, device_of(self)) for k, v in self._cached(lists).items()}
        self.prompts = lists
        if self.real is not None and tuple(self.real.images.shape[1:]) != self.sample_shape:
            raise ConfigError(f"real latents of shape {tuple(self.real.images.shape[1:])} (resolution "
                              f"{self.real.resolution}) but samples of shape {self.sample_shape}: set real_images' "
                              "resolution to 8 x the latent size")

    def train_batch(self, g: torch.Generator, world: int) -> dict[str, Tensor]:
        """A global batch for `world` devices: latent noise with random prompts, regression pairs, real latents."""
        n, m = self.hparams.batch_size * world, self.hparams.pair_batch_size * world
        z = torch.randn(n, *self.sample_shape, generator=g)
        prompt = torch.randint(0, len(self.prompts["train"]), (n,), generator=g)
        out = {"z": z, **self._cond("cond", "train", prompt)}
        if self.pairs is not None:
            idx = torch.randint(0, len(self.pairs), (m,), generator=g)
            out.update(pair_z=self.pairs.noise[idx].float(), pair_x=self.pairs.x[idx].float(),
                       **self._cond("pair_cond", "pairs", self.pairs.prompt_index[idx]))
        if self.real is not None:  # drawn last: runs without real images keep their streams
            idx = torch.randint(0, len(self.real.images), (n,), generator=g)
            out.update(real_x=self.real.images[idx].float(), **self._cond("real_cond", "real", idx))
        return out

    def _cond(self, key: str, kind: str, index: Tensor) -> dict[str, Tensor]:
        """{key: the cached embeddings of prompts `index` of list `kind`}, or with embed="device" {key_ids: their
        token ids}."""
        if self.hparams.embed == "cache":
            return {key: self.embeddings[kind][index].float()}
        if self.tokenizer is None:  # not at start-up: `dmd validate` and `predict` never need it
            self.tokenizer, self.text_encoder = load_text_encoder(self.hparams.text_encoder)
        return {f"{key}_ids": tokenize(self.tokenizer, [self.prompts[kind][i] for i in index.tolist()])}

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """embed="device": each `*_ids` entry encoded by the text encoder on the batch's device."""
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        for key in [k for k in batch if k.endswith("_ids")]:
            ids = batch.pop(key)
            if next(self.text_encoder.parameters()).device != ids.device:
                self.text_encoder.to(ids.device)
            with torch.no_grad():
                batch[key.removesuffix("_ids")] = self.text_encoder(ids)[0].float()
        return batch

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one latent (C, H, W), which the model checks against its teacher."""
        return tuple(self.pairs.noise.shape[1:]) if self.pairs is not None else tuple(self.hparams.latent_shape)

    def train_dataloader(self) -> DataLoader:
        return self.stream_loader(self.train_batch, self.hparams.seed)

    def val_dataloader(self) -> DataLoader:
        hp = self.hparams
        batches = _ValBatches(self.val_prompts, self.embeddings["val"], list(self.sample_shape),
                              hp.val_size, hp.val_batch_size, hp.seed + 1)
        return DataLoader(batches, batch_size=None)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader
