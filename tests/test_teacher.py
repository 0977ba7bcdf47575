"""The teacher recipe, its export, and the shipped Fashion-MNIST weights."""

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from lightning import Trainer
from torch.utils.data import DataLoader, TensorDataset

from dmd_lightning import PretrainedUNetDenoiser, VPSchedule
from dmd_lightning.fid import load_classifier
from dmd_lightning.fmnist import load_fashion_mnist, to_model_space
from dmd_lightning.samplers import make_scheduler, sample_ode
from dmd_lightning.teacher import TeacherModule

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_teacher_trains_and_exports_a_loadable_diffusers_folder(tmp_path, kind):
    x, y = load_fashion_mnist(split="test")
    data = DataLoader(TensorDataset(to_model_space(x[:64]), y[:64]), batch_size=16, shuffle=True)
    module = TeacherModule(block_out_channels=(16, 16, 32), layers_per_block=1, warmup_steps=1,
                           schedule=VPSchedule(prediction_type=kind))
    trainer = Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, data)
    module.export(tmp_path / "teacher")
    unet = UNet2DModel.from_pretrained(tmp_path / "teacher", subfolder="unet")
    assert unet.config.num_class_embeds == 11
    d = PretrainedUNetDenoiser(str(tmp_path / "teacher"))
    assert d.schedule.prediction_type == kind and d.null_label == 10
    for a, b in zip(d.unet.parameters(), module.ema.parameters()):
        torch.testing.assert_close(a, b)


def test_shipped_teacher_draws_the_requested_classes():
    """A real result of the shipped weights: the shipped classifier recognises the teacher's samples."""
    teacher = PretrainedUNetDenoiser(str(ROOT / "weights/fmnist-teacher")).eval()
    classifier = load_classifier(ROOT / "weights/fmnist-classifier.safetensors")
    labels = torch.arange(60) % 10
    z = torch.randn(60, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    x = sample_ode(teacher, z, make_scheduler("ddim", teacher.schedule.config), 20, labels)
    with torch.no_grad():
        accuracy = (classifier(x.clamp(-1, 1)).argmax(1) == labels).float().mean()
    assert accuracy > 0.5, accuracy  # chance is 0.1; measured 0.68 at 20 DDIM steps without guidance


def test_shipped_classifier_accuracy():
    x, y = load_fashion_mnist(split="test")
    classifier = load_classifier(ROOT / "weights/fmnist-classifier.safetensors")
    with torch.no_grad():
        accuracy = (classifier(to_model_space(x[:2000])).argmax(1) == y[:2000]).float().mean()
    assert accuracy > 0.92, accuracy
