"""Real images for DMD2's GAN on Stable Diffusion (Yin et al. 2024b, Sec. 4.3): captioned images, encoded once
by the teacher's VAE into a cache of latents that the data module samples from.

Sources:
- a folder with `metadata.jsonl` (one JSON object per line: `file_name` and a caption column `text`, `caption` or
  `prompt`, as diffusers' and HF datasets' imagefolder read it), or else images `name.png` (.jpg, .jpeg, .webp,
  .bmp) each with its caption in `name.txt`;
- a `.parquet` file with an image column (`image`: HF datasets' {bytes, path} struct or raw bytes; or `jpg`,
  `png`) and a caption column; needs pyarrow.

Each image is center-cropped to a square and Lanczos-resized to `resolution` (sd/eval.py's resize_pil), then
encoded to the MEAN of the VAE's posterior, not a sample: the cache is then the same on any device, batch size
and rerun, and a sample would be frozen into the cache anyway, adding no variety between epochs. (The official
code's latent script, main/sdxl/generate_vae_latents.py, stores one unseeded sample instead.)

The cache folder has the layout of a pair folder (data/format.py) with latents only: shards of `index` (n,) and
`x` (n, 4, resolution/8, resolution/8) float16, checksummed and written atomically; `captions.json`, one caption
per image; and manifest.json, written last. The manifest records the source, a fingerprint of its files (names,
sizes, modification times), the resolution and the VAE (its path and, for a local folder, its files'
fingerprint): a cache that matches is reused, else it is rebuilt, keeping the shards of an interrupted build
that match. Caption embeddings come from the data module's text
encoder and PromptEmbeddings' cache.
"""

from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dmd_lightning.data.format import (
    MANIFEST,
    MappedRows,
    PairsError,
    ShardError,
    atomic_write_bytes,
    map_shard,
    read_shard,
    shard_name,
    shard_range,
    write_manifest,
    write_shard,
)
from dmd_lightning.data.stream import RealImages
from dmd_lightning.errors import ConfigError
from dmd_lightning.loading import fingerprint, load_pretrained
from dmd_lightning.sd.eval import IMAGE_SUFFIXES, resize_pil, upright_rgb
from dmd_lightning.sd.model import encode_images, vae_subfolder

METADATA = "metadata.jsonl"
CAPTIONS = "captions.json"
CAPTION_COLUMNS = ("text", "caption", "prompt")  # imagefolder's default column first
IMAGE_COLUMNS = ("image", "jpg", "png")
LATENTS = ("x",)  # the one image tensor of a shard


def _caption_column(columns, where: str) -> str:
    column = next((c for c in CAPTION_COLUMNS if c in columns), None)
    if column is None:
        raise ConfigError(f"{where} has no caption column: expected one of {CAPTION_COLUMNS}, found {sorted(columns)}")
    return column


def caption_text(value) -> str:
    """A caption or prompt cell as text; a missing one (JSON or parquet null) is the empty, unconditional prompt,
    not the text "None"."""
    return "" if value is None else str(value).strip()


def folder_items(folder: Path) -> list[tuple[Path, str]]:
    """(image path, caption) of each image of a folder: metadata.jsonl's order, else sorted by name."""
    meta = folder / METADATA
    if meta.is_file():
        rows = [json.loads(line) for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()]
        if any("file_name" not in r for r in rows):
            raise ConfigError(f"{meta}: every line needs a file_name")
        return [(folder / r["file_name"], caption_text(r[_caption_column(r, str(meta))])) for r in rows]
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    missing = [p.with_suffix(".txt") for p in paths if not p.with_suffix(".txt").is_file()]
    if missing:
        raise ConfigError(f"{missing[0]} is missing: each image of {folder} needs its caption in a .txt of the same "
                          f"name, or the folder a {METADATA}")
    return [(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in paths]


def parquet_items(path: Path) -> Iterator[tuple[bytes, str]]:
    """(encoded image bytes, caption) of each row of a parquet file, read a few hundred rows at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow); or export the images to a folder "
                          f"with a {METADATA} or one .txt caption per image") from None
    f = pq.ParquetFile(path)
    names = f.schema_arrow.names
    image = next((c for c in IMAGE_COLUMNS if c in names), None)
    if image is None:
        raise ConfigError(f"{path} has no image column: expected one of {IMAGE_COLUMNS}, found {names}")
    caption = _caption_column(names, str(path))
    for batch in f.iter_batches(batch_size=256, columns=[image, caption]):
        for row in batch.to_pylist():
            data = row[image]
            yield (data["bytes"] if isinstance(data, dict) else data), caption_text(row[caption])


def source_files(source: Path) -> list[Path]:
    """The files whose names, sizes and modification times make a source's fingerprint."""
    if source.suffix == ".parquet":
        return [source]
    if (source / METADATA).is_file():
        return [source / METADATA] + [p for p, _ in folder_items(source)]
    return [q for p, _ in folder_items(source) for q in (p, p.with_suffix(".txt"))]


def vae_fingerprint(vae: str) -> str | None:
    """fingerprint of a local VAE folder's files (weights replaced in place rebuild the cache); None for a hub id."""
    sub = vae_subfolder(vae)
    folder = Path(vae) / sub if sub else Path(vae)
    return fingerprint(sorted(p for p in folder.iterdir() if p.is_file()), folder) if folder.is_dir() else None


def load_image(image, resolution: int) -> Tensor:
    """A path or encoded bytes -> (3, resolution, resolution) float in [-1, 1], center-cropped and resized."""
    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
        pixels = np.asarray(resize_pil(upright_rgb(im), resolution))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1


def load_encoder(path: str):
    """The teacher's AutoencoderKL (vae/ of a pipeline folder or hub id), frozen; the decoder is dropped."""
    from diffusers import AutoencoderKL

    vae = load_pretrained(AutoencoderKL, str(path), vae_subfolder(path))
    vae.decoder = vae.post_quant_conv = None  # only encode is used
    return vae.requires_grad_(False).eval()


class RealLatents(RealImages):
    """Captioned real images as latents of the teacher's VAE: `images` (N, 4, h, w) float16, memory-mapped;
    `captions` (N strings), whose embeddings the data module adds as `real_cond`; `labels` None.

    `source`: a folder or .parquet file (module docstring); `vae`: the teacher's pipeline folder or hub id;
    `resolution`: the image size the VAE sees (512 for SD1.5: latents 4x64x64). The cache lives in
    `cache_dir/real-<digest of source, vae, resolution>`; `build` fills it (once, on the training device), `load`
    opens it. `batch_size` images are encoded at once, decoded and resized by `workers` threads (PIL releases the
    GIL: about 35 ms per 700x600 JPEG on one core, slower than the VAE on a GPU); `shard_size` latents per file.
    """

    def __init__(self, source: str, vae: str, resolution: int = 512, cache_dir: str = "runs/real_cache",
                 batch_size: int = 16, shard_size: int = 10000, workers: int = 8):
        self.source, self.vae, self.resolution = Path(source), str(vae), resolution
        self.cache_dir, self.batch_size, self.shard_size, self.workers = Path(cache_dir), batch_size, shard_size, workers
        self.captions: list[str] | None = None

    @property
    def folder(self) -> Path:
        key = json.dumps([str(self.source.resolve()), self.vae, self.resolution])
        return self.cache_dir / f"real-{hashlib.sha256(key.encode()).hexdigest()[:16]}"

    def settings(self) -> dict:
        """What the latents depend on; stored in the manifest and in every shard."""
        if not self.source.exists():
            raise FileNotFoundError(f"real image source {str(self.source)!r} not found (a folder or .parquet file)")
        source = fingerprint(source_files(self.source), self.source)
        return {"source": str(self.source.resolve()), "source_fingerprint": source, "resolution": self.resolution,
                "vae": self.vae, "vae_fingerprint": vae_fingerprint(self.vae), "latents": "posterior mean",
                "shard_size": self.shard_size}

    def manifest(self) -> dict | None:
        try:
            return json.loads((self.folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return None

    def build(self, device: torch.device | str | None = None) -> Path:
        """Encode the source into the cache unless the cache matches it; returns the cache folder."""
        settings, manifest = self.settings(), self.manifest()
        if manifest is not None and all(manifest.get(k) == v for k, v in settings.items()):
            return self.folder
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / MANIFEST).unlink(missing_ok=True)  # a half-rebuilt cache is never taken for a finished one
        items = parquet_items(self.source) if self.source.suffix == ".parquet" else iter(folder_items(self.source))
        captions, images, vae = [], [], None
        for image, caption in items:
            captions.append(caption)
            images.append(image)
            if len(images) == self.shard_size:
                vae = self._write_shard(len(captions) // self.shard_size - 1, images, settings, vae, device)
                images = []
        if images:
            self._write_shard(len(captions) // self.shard_size, images, settings, vae, device)
        if not captions:
            raise ConfigError(f"real image source {self.source} holds no images")
        text = json.dumps(captions).encode()
        atomic_write_bytes(self.folder / CAPTIONS, text)
        write_manifest(self.folder, {**settings, "num_images": len(captions), "captions_sha256":
                                     hashlib.sha256(text).hexdigest(), "latent_shape": self._shape(0)})
        return self.folder

    def _write_shard(self, s: int, images: list, settings: dict, vae, device):
        """Encode shard s unless an earlier build left it whole and with these settings; returns the VAE."""
        path, indices = self.folder / shard_name(s), range(s * self.shard_size, s * self.shard_size + len(images))
        try:
            if read_shard(path, indices, LATENTS)[1] == settings:
                return vae
        except ShardError:
            pass
        vae = vae or load_encoder(self.vae).to(device or "cpu")
        with ThreadPoolExecutor(self.workers) as pool:
            load = partial(load_image, resolution=self.resolution)
            x = torch.cat([encode_images(vae, torch.stack(list(pool.map(load, images[b:b + self.batch_size]))))
                           for b in range(0, len(images), self.batch_size)])
        write_shard(path, {"index": torch.arange(indices.start, indices.stop), "x": x.half()}, settings)
        return vae

    def _shape(self, s: int) -> list[int]:
        return list(map_shard(self.folder / shard_name(s), LATENTS)["x"][0].shape[1:])

    def load(self, device: torch.device | str | None = None) -> RealLatents:
        """Build the cache if needed, verify its checksums and map its latents; once per process."""
        if self.captions is not None:
            return self
        self.build(device)
        manifest = self.manifest()
        n = manifest["num_images"]
        paths = [self.folder / shard_name(s) for s in range(-(-n // self.shard_size))]
        for s, path in enumerate(paths):
            try:
                read_shard(path, shard_range(s, n, self.shard_size), LATENTS)
            except ShardError as err:
                raise PairsError(f"real latent cache {path}: {err.why}; delete {self.folder} to rebuild it") from None
        text = (self.folder / CAPTIONS).read_bytes()
        if hashlib.sha256(text).hexdigest() != manifest["captions_sha256"]:
            raise PairsError(f"{self.folder / CAPTIONS} does not match its manifest; delete {self.folder} to rebuild")
        self.images = MappedRows([map_shard(p, LATENTS)["x"][0] for p in paths], "F16")
        self.captions = json.loads(text)
        return self


__all__ = ["RealLatents", "folder_items", "load_image", "parquet_items"]
