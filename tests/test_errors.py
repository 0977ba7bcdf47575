"""Bad input ends in one clear line: `error: ...` from the `dmd` command, or the project's own exception."""

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import tiny_unet
from test_module import fit, toy_module
from lightning import Callback, Trainer

from dmd_lightning import DMDModule, UNetDenoiser
from dmd_lightning.data import DMDDataModule
from dmd_lightning.fmnist import DataNotFoundError, load_fashion_mnist
from dmd_lightning.module import NonFiniteError, ShapeMismatchError, check_sample_shape
from dmd_lightning.pair_data import PairsError, write_manifest, write_shard

ROOT = Path(__file__).parents[1]


def dmd(*args: str, cwd=ROOT, env=None) -> tuple[int, list[str]]:
    out = subprocess.run(["dmd", *args], capture_output=True, text=True, cwd=cwd, env=env)
    lines = [line for line in out.stderr.splitlines() if line.strip() and "accelerate" not in line
             and line not in ("```", ".") and not line.startswith("Seed set to")]
    return out.returncode, lines


def test_missing_teacher_weights_are_one_line_through_dmd_fit(tmp_path):
    code, lines = dmd("fit", "--config", "configs/fmnist.yaml",
                      "--model.init_args.teacher.init_args.path", str(tmp_path / "no-teacher"))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: cannot load UNet2DModel") and "no-teacher" in lines[0]


def test_gpu_asked_for_where_none_exists_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, lines = dmd("fit", "--config", "configs/toy2d.yaml", "--trainer.accelerator", "gpu")
    assert code == 2 and lines == ["error: No supported gpu backend found!"]


def test_missing_data_root_names_it(tmp_path):
    with pytest.raises(DataNotFoundError, match=re.escape(f"data root {str(tmp_path / 'nowhere')!r} does not exist")):
        load_fashion_mnist(tmp_path / "nowhere")
    with pytest.raises(DataNotFoundError, match="train-images-idx3-ubyte"):
        load_fashion_mnist(tmp_path)


def test_empty_pairs_folder_is_refused(tmp_path):
    with pytest.raises(PairsError, match="manifest.json is missing"):
        DMDDataModule(str(tmp_path)).setup("fit")


def pairs_of_shape(folder: Path, shape: tuple[int, ...], n: int = 4):
    folder.mkdir()
    write_shard(folder / "shard-00000.safetensors", {"index": torch.arange(n), "noise": torch.randn(n, *shape),
                                                     "x": torch.randn(n, *shape), "cond": torch.zeros(n, dtype=torch.long)},
                {"teacher": "t"})
    write_manifest(folder, {"num_pairs": n, "shard_size": n, "num_shards": 1, "noise_shape": list(shape),
                            "num_classes": 10, "teacher": "t"})


def test_data_that_does_not_fit_the_teacher_names_both_shapes(tmp_path):
    unet, schedule = tiny_unet()  # 1 x 16 x 16
    teacher = UNetDenoiser(unet, schedule)
    check_sample_shape(teacher, (1, 16, 16))
    for shape in [(1, 28, 28), (3, 16, 16)]:
        with pytest.raises(ShapeMismatchError, match=re.escape(f"{shape} but the teacher UNet2DModel takes "
                                                               "(C, H, W) = (1, 16, 16)")):
            check_sample_shape(teacher, shape)
    pairs_of_shape(tmp_path / "p", (1, 28, 28))
    trainer = Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ShapeMismatchError, match=re.escape("(1, 28, 28)")):
        trainer.fit(DMDModule(teacher), datamodule=DMDDataModule(str(tmp_path / "p"), batch_size=2, pair_batch_size=2))


class PoisonGenerator(Callback):
    """Sets a generator weight to inf after the second iteration, just before the checkpoint at step 4."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 1:
            with torch.no_grad():
                next(pl_module.generator.parameters()).view(-1)[0] = float("inf")


def test_non_finite_weights_are_never_checkpointed_through_dmd_fit(tmp_path):
    config = tmp_path / "callbacks.yaml"
    config.write_text("""trainer:
  callbacks:
  - {class_path: test_errors.PoisonGenerator}
  - {class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {save_last: true, every_n_train_steps: 4}}
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    code, lines = dmd("fit", "--config", str(ROOT / "configs/toy2d.yaml"), "--config", str(config),
                      "--trainer.max_steps", "6", "--trainer.enable_progress_bar", "false",
                      "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
                      "--data.init_args.num_pairs", "64", "--data.init_args.sampler_steps", "10", cwd=tmp_path, env=env)
    assert code == 2, lines
    assert lines[-1] == "error: generator has non-finite weights at iteration 2; not saving", lines
    assert not list(tmp_path.rglob("*.ckpt"))


def test_non_finite_weights_stop_a_skipping_run(tmp_path):
    m = toy_module(on_nonfinite="skip")
    with torch.no_grad():
        next(m.generator.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"generator update at iteration 1 \(global step 0\): the generator's "
                                             "weights are non-finite"):
        fit(m, max_steps=4, tmp_path=tmp_path)


def test_every_load_is_safe():
    unsafe = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            if "weights_only=True" not in call:
                unsafe.append(f"{path.name}: {call}")
        if "trust_remote_code" in text:
            unsafe.append(f"{path.name}: trust_remote_code")
        if re.search(r"^\s*import pickle|pickle\.loads?\(", text, re.M):
            unsafe.append(f"{path.name}: pickle")
    assert not unsafe, unsafe
