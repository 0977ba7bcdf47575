"""Bad input ends in one clear line: `error: ...` from the `dmd` command (exit code 2), or the project's own
exception. USER_ERRORS is the table of the README's claim: every case one line, naming the key or file."""

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import dmd2, fit, fit_images, tiny_unet, toy_module
from lightning import Callback, Trainer

from dmd_lightning import DMDModule, UNetDenoiser
from dmd_lightning.checks import check_sample_shape
from dmd_lightning.cli import main
from dmd_lightning.data.format import PairsError, write_manifest, write_shard
from dmd_lightning.data.stream import DMDDataModule
from dmd_lightning.errors import DataNotFoundError, NonFiniteError, ShapeMismatchError
from dmd_lightning.fmnist.data import load_fashion_mnist

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
    m = toy_module()
    with torch.no_grad():
        next(m.generator.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"generator update at iteration 1 \(global step 0\): the generator's "
                                             "weights are non-finite"):
        fit(m, max_steps=4, tmp_path=tmp_path)


def test_non_finite_gan_head_weights_stop_the_run_at_once_and_are_never_saved(tmp_path):
    """The GAN head trains with the fake score (its optimizer): its weights count as the fake score's, so the first
    skipped fake-score update stops the run instead of the 20th, and a checkpoint of them is refused."""
    m = dmd2()
    with torch.no_grad():
        next(m.classifier.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"fake_score update at iteration 1 .*: the fake_score's weights are "
                                             "non-finite"):
        fit_images(m, tmp_path, max_steps=40)
    with pytest.raises(NonFiniteError, match="classifier has non-finite weights"):
        m.on_save_checkpoint({"state_dict": m.state_dict()})


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


TOY, FMNIST, PAIRS, TEACHER = "configs/toy2d.yaml", "configs/fmnist.yaml", "configs/fmnist_pairs.yaml", \
    "configs/fmnist_teacher.yaml"
M, D = "--model.init_args.", "--data.init_args."

# (name, arguments after the subcommand's config ({tmp} is a fresh folder), words the one line must contain)
USER_ERRORS = [
    ("t_range above 1", [TOY, M + "dm_loss.t_range", "[0.5, 1.2]"], ["t_range", "0 <= low < high <= 1"]),
    ("t_range reversed", [TOY, M + "dm_loss.t_range", "[0.9, 0.1]"], ["t_range"]),
    ("fake t_range below 0", [TOY, M + "fake_loss.t_range", "[-0.1, 1.0]"], ["fake_loss.t_range"]),
    ("negative guidance", [TOY, M + "dm_loss.guidance_scale", "-1"], ["guidance_scale=-1"]),
    ("negative regression weight", [TOY, M + "regression_weight", "-0.5"], ["regression_weight=-0.5"]),
    ("EMA decay above 1", [TOY, M + "ema_decay", "1.5"], ["ema_decay=1.5"]),
    ("no fake updates", [TOY, M + "fake_updates_per_generator_update", "0"], ["fake_updates_per_generator_update=0"]),
    ("unknown lr decay", [TOY, M + "optim.lr_decay", "linear"], ["lr_decay='linear'", "'cosine'"]),
    ("zero learning rate", [TOY, M + "optim.generator_lr", "0"], ["generator_lr=0"]),
    ("negative warm-up", [TOY, M + "optim.warmup_steps", "-1"], ["warmup_steps=-1"]),
    ("min lr ratio above 1", [TOY, M + "optim.min_lr_ratio", "2"], ["min_lr_ratio=2"]),
    ("no micro-batches", [TOY, M + "optim.accumulate", "0"], ["accumulate=0"]),
    ("unknown non-finite policy", [TOY, M + "nonfinite.action", "ignore"], ["nonfinite.action='ignore'"]),
    ("unknown compile mode", [TOY, M + "compile", '{"mode": "fastest"}'], ["compile.mode='fastest'"]),
    ("CUDA graphs with accumulation", [TOY, M + "compile", '{"mode": "reduce-overhead"}', M + "optim.accumulate", "2"],
     ["compile.mode='reduce-overhead'", "optim.accumulate=2"]),
    ("unknown non-finite check", [TOY, M + "nonfinite.check", "never"], ["nonfinite.check='never'"]),
    ("zero batch", [TOY, D + "batch_size", "0"], ["batch_size=0"]),
    ("negative pair batch", [TOY, D + "pair_batch_size", "-4"], ["pair_batch_size=-4"]),
    ("no pairs", [TOY, D + "num_pairs", "0"], ["num_pairs=0"]),
    ("no validation samples", [TOY, D + "val_size", "0"], ["val_size=0"]),
    ("unknown key", [TOY, M + "learning_rate", "1e-4"], ["learning_rate"]),
    ("missing checkpoint", [TOY, "--ckpt_path", "{tmp}/none.ckpt"], ["--ckpt_path", "none.ckpt"]),
    ("checkpoint that is no checkpoint", [TOY, "--ckpt_path", "{tmp}/notes.txt"], ["notes.txt", "dmd fit"]),
    ("checkpoint of another model", [TOY, "--ckpt_path", "{tmp}/other.ckpt"], ["not of this model"]),
    ("output folder under a file", [TOY, "--trainer.default_root_dir", "{tmp}/notes.txt/run",
                                    "--trainer.logger.init_args.save_dir", "{tmp}/notes.txt/run"], ["notes.txt"]),
    ("all updates non-finite", [TOY, M + "optim.generator_lr", "1e30", M + "optim.fake_lr", "1e30", M + "optim.gradient_clip", "1e30",
                                "--trainer.max_steps", "200", "--trainer.logger", "false",
                                "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", "{tmp}",
                                D + "num_pairs", "64", D + "sampler_steps", "4"], ["nonfinite.max_consecutive"]),
    ("missing pairs", [FMNIST, D + "pairs_dir", "{tmp}/no-pairs"], ["no-pairs", "dmd pairs"]),
    ("labels beyond the teacher's classes", [FMNIST, D + "pairs_dir", "{tmp}/pairs", D + "num_classes", "11",
                                             D + "expect", "null"], ["num_classes=11", "null label"]),
    ("pairs of another sampler", [FMNIST, D + "pairs_dir", "{tmp}/pairs", D + "expect.num_steps", "25"],
     ["num_steps"]),
    ("missing teacher", [FMNIST, M + "teacher.init_args.path", "{tmp}/no-teacher"], ["no-teacher"]),
    ("teacher: unknown lr decay", [TEACHER, M + "lr_decay", "step"], ["lr_decay='step'"]),
    ("teacher: zero batch", [TEACHER, D + "batch_size", "0"], ["batch_size=0"]),
]


def one_toy_checkpoint(folder: Path) -> None:
    """A checkpoint whose weights belong to no model here, and a text file."""
    (folder / "notes.txt").write_text("not a checkpoint")
    torch.save({"state_dict": {"generator.w": torch.ones(3)}, "pytorch-lightning_version": "2.6.0",
                "global_step": 0, "epoch": 0, "loops": {}}, folder / "other.ckpt")


def teacher_pairs(folder: Path) -> None:
    """Two pairs in the layout `dmd pairs` writes for configs/fmnist_pairs.yaml."""
    folder.mkdir()
    settings = {"teacher": "weights/fmnist-teacher", "sampler": "ddim", "num_steps": 50, "guidance_scale": 1.0}
    write_shard(folder / "shard-00000.safetensors", {"index": torch.arange(2), "noise": torch.randn(2, 1, 32, 32),
                                                     "x": torch.randn(2, 1, 32, 32), "cond": torch.arange(2)}, settings)
    write_manifest(folder, {"num_pairs": 2, "shard_size": 2, "num_shards": 1, "noise_shape": [1, 32, 32],
                            "num_classes": 10, "seed": 0, "dtype": "float32", **settings})


def run_main(args: list[str], capsys) -> tuple[int, list[str]]:
    """`dmd ARGS` in this process: its exit code and its non-empty stderr lines (Lightning's seed line left out).
    Library loggers keep the stderr of the test that created their handler, closed since: they get this one."""
    loggers = [logging.getLogger()] + [v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger)]
    for handler in (h for lg in loggers for h in lg.handlers if type(h) is logging.StreamHandler):
        handler.stream = sys.stderr  # not setStream: it would flush the closed one
        handler.__dict__.pop("flush", None)  # diffusers and transformers bind flush to the stderr of their import
    with pytest.raises(SystemExit) as exit:
        main(args)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not any(
        n in line for n in LIBRARY_CHATTER) and line.strip("`. ") != ""]
    return exit.value.code, lines


# What Lightning and diffusers print on every run, errors or not (their INFO lines and the `accelerate` hint)
LIBRARY_CHATTER = ("Seed set to", "GPU available", "TPU available", "💡 Tip", "Restoring states from",
                   "accelerate", "litlogger", "modules in eval mode", "Automatic Mixed Precision")


# the other subcommands: (name, the whole command line after `dmd`, words)
OTHER_ERRORS = [
    ("pairs: no pairs", ["pairs", "--config", PAIRS, D + "num_pairs", "0"], ["num_pairs=0"]),
    ("pairs: shape the teacher cannot take", ["pairs", "--config", PAIRS, D + "noise_shape", "[1, 28, 28]"],
     ["(1, 28, 28)", "(1, 32, 32)"]),
    ("validate: no last checkpoint",  # the logger's folder in {tmp}: not the last.ckpt of a run in runs/
     ["validate", "--config", TOY, "--ckpt_path", "last", "--trainer.logger.init_args.save_dir", "{tmp}"],
     ["--ckpt_path last", "no last.ckpt"]),
    ("export: not a checkpoint", ["export", "--config", FMNIST, "--ckpt_path", "{tmp}/notes.txt"], ["notes.txt"]),
    ("export: a generator without a UNet", ["export", "--config", TOY], ["OneStepGenerator", "MLPGenerator"]),
]
CASES = [(name, ["fit", "--config", *args], words) for name, args, words in USER_ERRORS] + OTHER_ERRORS


@pytest.mark.parametrize("name, args, words", CASES, ids=[c[0] for c in CASES])
def test_user_errors_are_one_line_naming_the_key(name, args, words, tmp_path, capsys, monkeypatch):
    one_toy_checkpoint(tmp_path)
    teacher_pairs(tmp_path / "pairs")
    monkeypatch.chdir(ROOT)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    args = args if "--trainer.default_root_dir" in args else [*args, "--trainer.default_root_dir", str(tmp_path)]
    code, lines = run_main(args, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), "\n".join(lines)
    assert all(w in lines[0] for w in words), lines[0]


def test_validate_without_a_checkpoint_warns_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    main(["validate", "--config", TOY, "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
          "--trainer.enable_progress_bar", "false", D + "num_pairs", "8", D + "val_size", "64"])
    err = capsys.readouterr().err
    assert "warning: `dmd validate` without --ckpt_path uses the untrained generator" in err
