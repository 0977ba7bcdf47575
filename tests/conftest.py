import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_unet(num_classes: int | None = 10, channels: int = 1, size: int = 16, prediction_type: str = "epsilon"):
    """A tiny class-conditional UNet2DModel and its schedule, random weights."""
    from diffusers import UNet2DModel

    from dmd_lightning import VPSchedule

    unet = UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=4, attention_head_dim=8,
        num_class_embeds=num_classes + 1 if num_classes else None,
    )
    return unet, VPSchedule(prediction_type=prediction_type)


def toy_module(**kw):
    """DMDModule on the 2-D toy with small MLPs: a training step in milliseconds."""
    from dmd_lightning import DMDModule, L2Loss, VPSchedule
    from dmd_lightning.toy2d.mixture import GaussianMixtureDenoiser, MLPDenoiser, MLPGenerator

    schedule = VPSchedule()
    return DMDModule(GaussianMixtureDenoiser(schedule), MLPGenerator(hidden=32), MLPDenoiser(schedule, hidden=32),
                     regression_loss=L2Loss(), generator_lr=1e-3, fake_lr=1e-3, warmup_steps=2, **kw)


def fit(module, max_steps, tmp_path, ckpt_path=None, **kw):
    """Trains `module` on the toy data, quietly, on the CPU; the Trainer."""
    from lightning import Trainer

    from dmd_lightning.toy2d.mixture import ToyDataModule

    trainer = Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, limit_val_batches=0, accelerator="cpu", **kw)
    trainer.fit(module, datamodule=ToyDataModule(batch_size=32, pair_batch_size=16, num_pairs=64, sampler_steps=10),
                ckpt_path=ckpt_path)
    return trainer
