"""Training the Fashion-MNIST teacher: a class-conditional pixel-space diffusers UNet2DModel.

DDPM loss (Ho et al. 2020, Eq. 14) in the schedule's parameterization (epsilon, or v / x0), with label dropout for classifier-free guidance
(Ho & Salimans 2022): a dropped label becomes the null class `num_classes`. The EMA weights are exported as
a diffusers folder (unet/ + scheduler/) that `UNet2DModel.from_pretrained` and `PretrainedUNetDenoiser` load.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning import Callback, LightningDataModule, LightningModule
from torch.utils.data import DataLoader, TensorDataset

from .ema import ema_tensors, ema_update, warmup_decay
from .fmnist import DEFAULT_ROOT, load_fashion_mnist, to_model_space
from .schedule import VPSchedule


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
    """Trains the teacher UNet; `export(folder)` writes its EMA as a diffusers folder."""

    def __init__(self, num_classes: int = 10, block_out_channels: tuple[int, ...] = (32, 64, 128),
                 layers_per_block: int = 2, schedule: VPSchedule | None = None, lr: float = 2e-4,
                 warmup_steps: int = 500, label_dropout: float = 0.1, ema_decay: float = 0.9995):
        super().__init__()
        self.save_hyperparameters(ignore=["schedule"])
        self.schedule = schedule or VPSchedule()
        self.unet = fmnist_unet(num_classes, block_out_channels, layers_per_block)
        self.ema = copy.deepcopy(self.unet).requires_grad_(False).eval()
        self._ema_tensors: tuple | None = None  # built once per fit: walking the modules each step costs

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
        decay = warmup_decay(self.hparams.ema_decay, self.global_step)
        if self._ema_tensors is None:
            self._ema_tensors = ema_tensors(self.ema, self.unet)
        ema_update(self._ema_tensors, decay)

    def on_train_start(self) -> None:
        self._ema_tensors = None  # a device move since the last fit replaces the tensors

    def train(self, mode: bool = True):
        super().train(mode)
        self.ema.eval()
        return self

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.unet.parameters(), lr=self.hparams.lr, weight_decay=0.0)
        warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / self.hparams.warmup_steps))
        return [opt], [{"scheduler": warm, "interval": "step"}]

    def export(self, folder: str | Path) -> None:
        from diffusers import DDPMScheduler

        folder = Path(folder)
        self.ema.save_pretrained(folder / "unet", safe_serialization=True)
        DDPMScheduler(**self.schedule.config, clip_sample=False).save_pretrained(folder / "scheduler")


class ExportTeacher(Callback):
    """Writes the EMA teacher as a diffusers folder every `every_n_steps` and when training ends."""

    def __init__(self, folder: str = "weights/fmnist-teacher", every_n_steps: int = 1000):
        self.folder, self.every_n_steps = folder, every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0 and trainer.is_global_zero:
            pl_module.export(self.folder)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            pl_module.export(self.folder)


class FashionMNISTDataModule(LightningDataModule):
    """Labelled Fashion-MNIST images in [-1, 1], 32x32 (zero-padded), for teacher training."""

    def __init__(self, data_root: str = DEFAULT_ROOT, batch_size: int = 128, num_workers: int = 0,
                 split: str = "train"):
        super().__init__()
        self.save_hyperparameters()
        self.dataset: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            images, labels = load_fashion_mnist(self.hparams.data_root, self.hparams.split)
            self.dataset = TensorDataset(to_model_space(images), labels)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0)
