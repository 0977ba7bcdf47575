"""`dmd export` of pixel-space generators: diffusers' DiffusionPipeline.from_pretrained runs the folder in one call
and gives the generator's images (one step and K steps, the same fresh noise between them); `dmd predict` with
configs/exported.yaml samples from the folder alone exactly as the checkpoint does."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import teacher_v
from safetensors.torch import load_file

from dmd_lightning import DMDModule
from dmd_lightning.cli import cli
from dmd_lightning.errors import ConfigError
from dmd_lightning.export import export_module, step_scheduler
from dmd_lightning.generator import MultiStepGenerator

ROOT = Path(__file__).parents[1]


def student(steps):
    """A DMDModule on the tiny v-prediction teacher whose EMA generator differs from the teacher."""
    teacher = teacher_v()
    generator = MultiStepGenerator.from_teacher(teacher, steps) if len(steps) > 1 else None
    module = DMDModule(teacher, generator)
    with torch.no_grad():
        for p in module.generator_ema.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return module


@pytest.mark.parametrize("steps", [(999,), (999, 749, 499, 249), (999, 500, 100)], ids=["1", "4", "3-uneven"])
def test_pixel_export_runs_in_diffusers_as_the_generator(steps, tmp_path):
    from diffusers import DiffusionPipeline

    module = student(steps)
    export_module(module, tmp_path / "export")
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "export"))
    pipe.set_progress_bar_config(disable=True)
    labels = torch.tensor([0, 3, 9])
    images = pipe(batch_size=3, class_labels=labels, num_inference_steps=None, timesteps=list(steps),
                  generator=torch.Generator().manual_seed(7), output_type="pt").images
    g = torch.Generator().manual_seed(7)  # the pipeline draws the initial noise, then each step's fresh noise
    with torch.no_grad():
        x = module.generator_ema(torch.randn(3, 1, 16, 16, generator=g), labels, g)
    torch.testing.assert_close(images, (x / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=0)
    assert pipe.scheduler.timesteps.tolist() == list(steps)

    # the folder's README gives the call; run it as written
    readme = (tmp_path / "export" / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.DOTALL).group(1)
    scope = {}
    exec(code, scope)  # noqa: S102 - the snippet this test wrote
    assert len(scope["images"]) == 4 and scope["images"][0].size == (16, 16)
    assert ("timesteps=" in code) == (steps == (999, 500, 100))  # num_inference_steps alone where it gives them


def test_a_batch_gives_the_same_images_on_any_rank(tmp_path):
    """The noise between steps is seeded by the batch's global index and the data's seed: on rank 1 of 2, local
    batch b is global batch 2b + 1, and its images are those of one process (checkpoint and exported folder alike)."""
    from types import SimpleNamespace

    from dmd_lightning.export.pretrained import ExportedGenerator

    module = student((999, 499))
    export_module(module, tmp_path / "export")
    exported = ExportedGenerator(str(tmp_path / "export"))
    g = torch.Generator().manual_seed(3)
    batches = [{"z": torch.randn(2, 1, 16, 16, generator=g), "cond": torch.tensor([1, 2])} for _ in range(4)]
    for model in (module, exported):
        one = [model.predict_step(b, i)["x"] for i, b in enumerate(batches)]
        model._trainer = SimpleNamespace(global_rank=1, world_size=2)  # what Lightning's DDP would attach
        two = [model.predict_step(b, i)["x"] for i, b in enumerate(batches[1::2])]
        torch.testing.assert_close(two, one[1::2], atol=1e-6, rtol=0)
        assert not torch.allclose(one[0], model.predict_step(batches[0], 0)["x"])  # not just the batch's noise
        # the data's evaluation seed reaches it too: validation and report seeds never share that noise
        first, second = (model.predict_step({**batches[0], "seed": torch.tensor(s)}, 0)["x"] for s in (1, 2))
        assert not torch.allclose(first, second)


def test_export_of_the_raw_generator_in_half_precision(tmp_path):
    module = student((999,))
    export_module(module, tmp_path / "export", ema=False, dtype="float16")
    saved = load_file(tmp_path / "export" / "unet" / "diffusion_pytorch_model.safetensors")
    for k, v in module.generator.denoiser.unet.state_dict().items():
        assert saved[k].dtype == torch.float16 and torch.equal(saved[k], v.half()), k
    info = json.loads((tmp_path / "export" / "generator.json").read_text())
    assert info == {"timesteps": [999], "null_label": 10, "sample_shape": [1, 16, 16]}


def test_a_step_at_t0_is_refused():
    with pytest.raises(ConfigError, match="t=0"):
        step_scheduler(teacher_v().schedule.config, (999, 0))


def fit_config(tmp: Path) -> Path:
    """A 2-step DMD run on the tiny teacher saved as a diffusers folder, with random real images as data."""
    torch.manual_seed(0)
    teacher = teacher_v()
    teacher.unet.save_pretrained(tmp / "teacher" / "unet")
    from diffusers import DDPMScheduler

    DDPMScheduler.from_config(teacher.schedule.config).save_pretrained(tmp / "teacher" / "scheduler")
    unet = {"class_path": "dmd_lightning.PretrainedUNetDenoiser", "init_args": {"path": str(tmp / "teacher")}}
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp),
                    "callbacks": [{"class_path": "dmd_lightning.predict.SampleWriter",
                                   "init_args": {"out": str(tmp / "checkpoint.npz")}}]},
        "model": {"class_path": "dmd_lightning.DMDModule", "init_args": {
            "teacher": unet, "regression_loss": None, "evaluator": None, "optim": {"warmup_steps": 0, "generator_lr": 1e-2},
            "generator": {"class_path": "dmd_lightning.generator.MultiStepGenerator",
                          "init_args": {"denoiser": unet, "timesteps": [999, 499]}}}},
        "data": {"class_path": "dmd_lightning.data.stream.DMDDataModule", "init_args": {
            "pairs_dir": None, "real_images": {"class_path": "conftest.RandomImages"}, "batch_size": 2,
            "val_size": 6, "val_batch_size": 4, "val_seed": 1}},
    }
    (tmp / "run.yaml").write_text(yaml.safe_dump(config))  # not config.yaml: `dmd fit` writes that one
    return tmp / "run.yaml"


def test_dmd_export_then_predict_from_the_folder_gives_the_checkpoints_images(tmp_path, capsys):
    from diffusers import DiffusionPipeline

    config = str(fit_config(tmp_path))
    run = cli(["fit", "--config", config, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"])
    run.trainer.save_checkpoint(tmp_path / "last.ckpt")
    ckpt = ["--ckpt_path", str(tmp_path / "last.ckpt")]
    cli(["export", "--config", config, *ckpt, "--out_dir", str(tmp_path / "export")])
    assert f"exported the EMA generator to {tmp_path / 'export'}" in capsys.readouterr().out
    assert type(DiffusionPipeline.from_pretrained(str(tmp_path / "export"))).__name__ == "ConsistencyModelPipeline"

    cli(["predict", "--config", config, *ckpt])
    cli(["predict", "--config", str(ROOT / "configs/exported.yaml"), "--model.init_args.path", str(tmp_path / "export"),
         "--data.init_args.num_samples", "6", "--data.init_args.batch_size", "4", "--trainer.accelerator", "cpu",
         "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "exported"),
         "--trainer.callbacks.out", str(tmp_path / "exported.npz")])
    assert "without --ckpt_path" not in capsys.readouterr().err  # the folder holds trained weights
    ours, theirs = np.load(tmp_path / "exported.npz"), np.load(tmp_path / "checkpoint.npz")
    assert ours["images"].shape == (6, 16, 16, 1) and ours["labels"].tolist() == [0, 1, 2, 3, 4, 5]
    assert np.array_equal(ours["images"], theirs["images"]) and np.array_equal(ours["labels"], theirs["labels"])
    cli(["predict", "--config", config, "--trainer.callbacks.out", str(tmp_path / "untrained.npz")])
    assert not np.array_equal(np.load(tmp_path / "untrained.npz")["images"], theirs["images"])  # training changed them
