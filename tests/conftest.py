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
