"""Training the Fashion-MNIST teacher: a class-conditional pixel-space diffusers UNet2DModel.

DDPM loss (Ho et al. 2020, Eq. 14) in the schedule's parameterization (epsilon, or v / x0), with label dropout for
classifier-free guidance (Ho & Salimans 2022): a dropped label becomes the null class `num_classes`. The EMA
weights are exported as a diffusers folder (unet/ + scheduler/) that `UNet2DModel.from_pretrained` and
`PretrainedUNetDenoiser` load, with `provenance.json` and the run's `config.yaml` beside them.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning import Callback, LightningDataModule, LightningModule
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from dmd_lightning.ema import EMA
from dmd_lightning.errors import ConfigError, check_choice, check_int, check_number
from dmd_lightning.fmnist.data import DEFAULT_ROOT, load_fashion_mnist, to_model_space
from dmd_lightning.optim import adamw_with_schedule
from dmd_lightning.schedule import VPSchedule


def fmnist_unet(num_classes: int = 10, block_out_channels: tuple[int, ...] = (32, 64, 128), layers_per_block: int = 2):
    """The teacher's architecture: 32x32x1, attention at 8x8 only (cheap on CPU), one extra null class."""
    from diffusers import UNet2DModel

    n = len(block_out_channels)
    return UNet2DModel(
        sample_size=32, in_channels=1, out_channels=1, block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block, down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1), num_class_embeds=num_classes + 1,
        norm_num_groups=16, attention_head_dim=32,
    )


class TeacherModule(LightningModule):
    """Trains the teacher UNet; `export(folder)` writes its EMA as a diffusers folder.

    AdamW with a linear warm-up over `warmup_steps`, then constant or (`lr_decay="cosine"`) a half cosine to
    `min_lr_ratio` x lr at the trainer's max_steps. `compile=True` compiles the UNet's forward (not the module)
    with torch.compile when training starts: a 4 M-parameter UNet at 32x32 is otherwise bound by kernel launches.
    """

    def __init__(self, num_classes: int = 10, block_out_channels: tuple[int, ...] = (32, 64, 128),
                 layers_per_block: int = 2, schedule: VPSchedule | None = None, lr: float = 2e-4,
                 warmup_steps: int = 500, lr_decay: str = "constant", min_lr_ratio: float = 0.0,
                 label_dropout: float = 0.1, ema_decay: float = 0.9995, compile: bool = False):
        super().__init__()
        check_choice("lr_decay", lr_decay, ("constant", "cosine"))
        check_number("lr", lr, 0.0, low_open=True)
        check_int("warmup_steps", warmup_steps, 0)
        check_number("min_lr_ratio", min_lr_ratio, 0.0, 1.0)
        check_number("label_dropout", label_dropout, 0.0, 1.0)
        check_number("ema_decay", ema_decay, 0.0, 1.0)
        self.save_hyperparameters(ignore=["schedule"])
        self.schedule = schedule or VPSchedule()
        self.unet = fmnist_unet(num_classes, block_out_channels, layers_per_block)
        self.ema = copy.deepcopy(self.unet).requires_grad_(False).eval()
        self.averager = EMA(self.ema, self.unet, ema_decay)
        self._averaged = 0  # the global step of the last EMA update

    def training_step(self, batch, batch_idx):
        x, y = batch
        drop = torch.rand(y.shape, device=y.device) < self.hparams.label_dropout
        y = torch.where(drop, torch.full_like(y, self.hparams.num_classes), y)
        t = torch.randint(0, self.schedule.T, (x.shape[0],), device=x.device)
        eps = torch.randn_like(x)
        x_t = self.schedule.add_noise(x, eps, t)
        pred = self.unet(x_t, t, class_labels=y).sample
        target = eps if self.schedule.prediction_type == "epsilon" else self.schedule.from_x0(x, x_t, t)
        loss = F.mse_loss(pred.float(), target)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.global_step != self._averaged:  # once per optimizer step (accumulate_grad_batches: not per batch)
            self._averaged = self.global_step
            self.averager.update(self.global_step - 1)  # after the optimizer's step: the updates before it

    def on_train_start(self) -> None:
        self.averager.reset()  # a device move since the last fit replaces buffers
        self._averaged = self.global_step
        if self.hparams.compile and not getattr(self.unet, "_compiled_call_impl", None):
            self.unet.compile()  # in place: parameter names and the exported state dict stay the same

    def train(self, mode: bool = True):
        super().train(mode)
        self.ema.eval()
        return self

    def configure_optimizers(self):
        hp = self.hparams
        total = self.trainer.max_steps if hp.lr_decay == "cosine" else None
        if total is not None and total <= 0:
            raise ConfigError("lr_decay='cosine' needs the trainer's max_steps")
        opt, sched = adamw_with_schedule(self.unet.parameters(), hp.lr, (0.9, 0.999), 0.0, hp.warmup_steps, total,
                                         hp.min_lr_ratio)
        return [opt], [{"scheduler": sched, "interval": "step"}]

    def export(self, folder: str | Path, provenance: dict | None = None) -> None:
        """The EMA UNet and the scheduler as a diffusers folder; `provenance` goes to provenance.json beside them."""
        from diffusers import DDPMScheduler

        folder = Path(folder)
        self.ema.save_pretrained(folder / "unet", safe_serialization=True)
        DDPMScheduler(**self.schedule.config, clip_sample=False).save_pretrained(folder / "scheduler")
        if provenance is not None:
            (folder / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")


class ExportTeacher(Callback):
    """Writes the EMA teacher as a diffusers folder every `every_n_steps` and when training ends, with its
    provenance: the run's config.yaml (as LightningCLI saved it, overrides included) and provenance.json
    (steps, epochs, batch, precision, wall time summed over resumed runs, hardware, versions, commit).

    The commit is $DMD_GIT_COMMIT where set, else `git rev-parse HEAD` (with `-dirty` for local changes)."""

    def __init__(self, folder: str = "weights/fmnist-teacher", every_n_steps: int = 1000):
        check_int("every_n_steps", every_n_steps)
        self.folder, self.every_n_steps = folder, every_n_steps
        self.wall_s, self._start = 0.0, None  # training wall time of earlier (resumed-from) runs; this run's start

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.time()

    def state_dict(self) -> dict:
        return {"wall_s": self._elapsed()}

    def load_state_dict(self, state: dict) -> None:
        self.wall_s = float(state.get("wall_s", 0.0))

    def _elapsed(self) -> float:
        return self.wall_s + (time.time() - self._start if self._start is not None else 0.0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.export(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.export(trainer, pl_module)

    def export(self, trainer, pl_module) -> None:
        """Called on every rank (trainer.log_dir is a collective, a broadcast); rank 0 writes."""
        config = Path(trainer.log_dir or "") / "config.yaml"
        if not trainer.is_global_zero:
            return
        pl_module.export(self.folder, self.provenance(trainer, pl_module))
        if config.is_file():
            shutil.copyfile(config, Path(self.folder) / "config.yaml")

    def provenance(self, trainer, pl_module) -> dict:
        dm = trainer.datamodule
        batch = dm.hparams.get("batch_size") if dm is not None else None
        n = len(dm.dataset) if getattr(dm, "dataset", None) is not None else None
        steps = trainer.global_step
        samples = steps * batch * trainer.world_size if batch else None
        return {
            "steps": steps, "batch_size": batch, "devices": trainer.world_size,
            "epochs": round(samples / n, 2) if samples and n else None,
            "precision": str(trainer.precision), "compiled": bool(pl_module.hparams.get("compile", False)),
            "wall_s": round(self._elapsed(), 1),
            "hardware": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
            "versions": {"torch": torch.__version__, **_versions("lightning", "diffusers")},
            "commit": git_commit(), "config": "config.yaml",
        }


def _versions(*names: str) -> dict:
    import importlib.metadata as md

    return {n: md.version(n) for n in names}


def git_commit() -> str | None:
    """$DMD_GIT_COMMIT where set (a copy of the tree on another machine may carry stale git metadata), else
    HEAD of the checkout this code runs from (suffix -dirty with local changes)."""
    if os.environ.get("DMD_GIT_COMMIT"):
        return os.environ["DMD_GIT_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


class FashionMNISTDataModule(LightningDataModule):
    """Labelled Fashion-MNIST images in [-1, 1], 32x32 (zero-padded), for teacher training.

    Batches are drawn by index lists (one tensor gather per batch, not one `__getitem__` per image): at batch
    512 the per-image path costs more than the GPU step. An epoch is a random permutation, the last partial
    batch dropped."""

    def __init__(self, data_root: str = DEFAULT_ROOT, batch_size: int = 128, num_workers: int = 0,
                 split: str = "train"):
        super().__init__()
        check_int("batch_size", batch_size)
        check_int("num_workers", num_workers, 0)
        self.save_hyperparameters()
        self.dataset: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            images, labels = load_fashion_mnist(self.hparams.data_root, self.hparams.split)
            self.dataset = TensorDataset(to_model_space(images), labels)

    def train_dataloader(self) -> DataLoader:
        batches = BatchSampler(RandomSampler(self.dataset), self.hparams.batch_size, drop_last=True)
        workers = self.hparams.num_workers
        return DataLoader(self.dataset, sampler=batches, batch_size=None, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
