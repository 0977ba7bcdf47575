import os
import warnings

import pytest
import torch

from dmd_lightning.data.stream import RealImages

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


def toy_module(optim: dict | None = None, **kw):
    """DMDModule on the 2-D toy with small MLPs: a training step in milliseconds. optim: Optimization's
    arguments over the toy's (lr 1e-3, 2 warm-up steps)."""
    from dmd_lightning import DMDModule, L2Loss, VPSchedule
    from dmd_lightning.toy2d.mixture import GaussianMixtureDenoiser, MLPDenoiser, MLPGenerator

    schedule = VPSchedule()
    return DMDModule(GaussianMixtureDenoiser(schedule), MLPGenerator(hidden=32), MLPDenoiser(schedule, hidden=32),
                     regression_loss=L2Loss(), optim=toy_optim(**(optim or {})), **kw)


def toy_optim(**kw):
    """Optimization for tests: lr 1e-3, 2 warm-up steps, unless given."""
    from dmd_lightning.optim import Optimization

    return Optimization(**{"generator_lr": 1e-3, "fake_lr": 1e-3, "warmup_steps": 2, **kw})


def fit(module, max_steps, tmp_path, ckpt_path=None, **kw):
    """Trains `module` on the toy data, quietly, on the CPU; the Trainer."""
    from lightning import Trainer

    from dmd_lightning.toy2d.mixture import ToyDataModule

    trainer = Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, limit_val_batches=0, accelerator="cpu", **kw)
    trainer.fit(module, datamodule=ToyDataModule(batch_size=32, pair_batch_size=16, num_pairs=64, sampler_steps=10),
                ckpt_path=ckpt_path)
    return trainer


class RandomImages(RealImages):
    """64 random 1x16x16 images with labels 0..9, as real images for the GAN."""

    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(5)
        self.images, self.labels = torch.rand(n, 1, 16, 16, generator=g) * 2 - 1, torch.arange(n) % 10


def teacher_v():
    """A tiny v-prediction UNet teacher on a zero-terminal-SNR schedule, as teacher v2 is."""
    from dmd_lightning import UNetDenoiser, VPSchedule

    torch.manual_seed(0)
    unet, _ = tiny_unet(prediction_type="v_prediction")
    return UNetDenoiser(unet, VPSchedule(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                         timestep_spacing="trailing"))


def dmd2(steps=(999,), **kw):
    """DMD2 on the tiny teacher: GAN weights of the paper, no regression, two fake updates per generator update."""
    from dmd_lightning import DMDModule
    from dmd_lightning.gan import GANLoss
    from dmd_lightning.generator import MultiStepGenerator

    t = teacher_v()
    generator = MultiStepGenerator.from_teacher(t, steps) if len(steps) > 1 else None
    args = dict(regression_loss=None, gan=GANLoss(generator_weight=3e-3, classifier_weight=1e-2),
                optim=toy_optim(warmup_steps=0), fake_updates_per_generator_update=2)
    return DMDModule(t, generator, **{**args, **kw})
