"""Pair generation: shards round-trip the sampler's output, resume skips finished shards, ranks split the work,
and every broken pair folder gives one error that names the file."""

import os
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler
from lightning import Callback
from safetensors.torch import load_file, save_file

from dmd_lightning import PretrainedUNetDenoiser, UNetDenoiser, VPSchedule
from dmd_lightning.cli import DMDTrainer
from dmd_lightning.data.format import MANIFEST, PairDataset, PairsError, item_noise, shard_name
from dmd_lightning.data.generation import PairGenerationDataModule, PairGenerator, PairWriter
from dmd_lightning.errors import ShapeMismatchError
from dmd_lightning.samplers import make_scheduler, sample_ode
from dmd_lightning.toy2d.mixture import GaussianMixtureDenoiser


def toy_datamodule(out_dir, **kwargs):
    args = dict(num_pairs=25, shard_size=10, noise_shape=[2], num_classes=None, batch_size=4, seed=3)
    return PairGenerationDataModule(str(out_dir), **{**args, **kwargs})


def toy_generator(sampler="ddim", num_steps=8):
    return PairGenerator(GaussianMixtureDenoiser(VPSchedule()), sampler=sampler, num_steps=num_steps)


def generate(out_dir, model=None, devices=1, **kwargs):
    trainer = DMDTrainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                         logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.pairs(model or toy_generator(), toy_datamodule(out_dir, **kwargs))


def stats(folder):
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(Path(folder).iterdir())}


def test_shards_round_trip_the_sampler_output(tmp_path):
    generate(tmp_path)
    data = PairDataset(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"] + [shard_name(s) for s in range(3)]
    noise = torch.stack([item_noise(3, i, [2]) for i in range(25)])
    teacher = GaussianMixtureDenoiser(VPSchedule())
    expected = sample_ode(teacher, noise, make_scheduler("ddim", teacher.schedule.config), 8)
    assert len(data) == 25 and data.cond is None and torch.equal(data.noise[:], noise)
    torch.testing.assert_close(data.x[:], expected, atol=1e-5, rtol=1e-5)
    assert set(data[7]) == {"pair_z", "pair_x"} and torch.equal(data[7]["pair_z"], noise[7])
    assert data.manifest["teacher"] == "GaussianMixtureDenoiser" and data.manifest["num_shards"] == 3


def test_batches_never_straddle_shards(tmp_path):
    batches = list(toy_datamodule(tmp_path).predict_dataloader())
    assert [b["index"].tolist() for b in batches[:4]] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]
    assert torch.equal(torch.cat([b["index"] for b in batches]), torch.arange(25))


def test_rerun_skips_finished_shards_and_regenerates_only_missing_ones(tmp_path):
    generate(tmp_path)
    before, first = stats(tmp_path), PairDataset(tmp_path)
    generate(tmp_path)
    assert stats(tmp_path) == before  # nothing rewritten, not even the manifest
    (tmp_path / shard_name(1)).unlink()
    generate(tmp_path)
    after = stats(tmp_path)
    assert {k for k in after if after[k] != before.get(k)} == {shard_name(1)}
    again = PairDataset(tmp_path)
    assert torch.equal(again.noise[:], first.noise[:]) and torch.equal(again.x[:], first.x[:])


def test_ranks_split_shards_with_the_single_rank_noise(tmp_path):
    def served(rank, world):
        dm = toy_datamodule(tmp_path, num_pairs=45)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)
        return {int(b["index"][0]) // 10: b for b in dm.predict_dataloader()}  # first batch of each shard

    single, rank0, rank1 = served(0, 1), served(0, 2), served(1, 2)
    assert set(rank0) == {0, 2, 4} and set(rank1) == {1, 3}
    for s, batch in {**rank0, **rank1}.items():
        assert torch.equal(batch["noise"], single[s]["noise"]) and torch.equal(batch["index"], single[s]["index"])


def test_two_process_ddp_run_equals_a_single_rank_run(tmp_path):
    generate(tmp_path / "ddp", devices=2, num_pairs=45)
    generate(tmp_path / "single", num_pairs=45)
    ddp, single = PairDataset(tmp_path / "ddp"), PairDataset(tmp_path / "single")
    assert torch.equal(ddp.noise[:], single.noise[:]) and torch.equal(ddp.x[:], single.x[:])


def test_truncated_shard_is_named_and_regenerated(tmp_path):
    generate(tmp_path)
    first = PairDataset(tmp_path).x[:]  # a copy: the dataset maps the files, and this one is cut in place
    path = tmp_path / shard_name(2)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(PairsError, match=f"{shard_name(2)}.*truncated or corrupted"):
        PairDataset(tmp_path)
    generate(tmp_path)
    assert torch.equal(PairDataset(tmp_path).x[:], first)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_or_unchecksummed_shards_are_refused_and_regenerated(tmp_path, capsys):
    generate(tmp_path)
    first = PairDataset(tmp_path).x[:]
    flip_byte(tmp_path / shard_name(1), -1)  # the last byte of x's data
    with pytest.raises(PairsError, match=f"{shard_name(1)}: checksum mismatch in 'x'; rerun `dmd pairs`"):
        PairDataset(tmp_path)
    old = load_file(str(tmp_path / shard_name(2)))  # as written before checksums existed
    save_file(old, str(tmp_path / shard_name(2)), metadata={"settings": '{"teacher": "GaussianMixtureDenoiser"}'})
    capsys.readouterr()
    generate(tmp_path)
    assert [line for line in capsys.readouterr().out.splitlines() if "regenerating" in line] == [
        f"{shard_name(1)}: checksum mismatch in 'x'; regenerating",
        f"{shard_name(2)}: no checksums (written by an older version of dmd_lightning); regenerating"]
    assert torch.equal(PairDataset(tmp_path).x[:], first)
    flip_byte(tmp_path / shard_name(0), 20)  # in the header
    with pytest.raises(PairsError, match=f"{shard_name(0)}: .*rerun `dmd pairs`"):
        PairDataset(tmp_path)


def test_stale_temporary_files_of_live_writers_are_kept(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    tmp = {who: tmp_path / f".{shard_name(s)}.tmp-{pid}" for who, s, pid in [
        ("dead", 0, dead.pid), ("self", 2, os.getpid()), ("live", 4, os.getppid()), ("other rank", 1, dead.pid)]}
    for path in tmp.values():
        path.write_bytes(b"partial")
    PairWriter(str(tmp_path)).remove_stale_files(rank=0, world=2)
    assert {who for who, path in tmp.items() if path.exists()} == {"live", "other rank"}


def test_a_noise_shape_the_teacher_cannot_take_is_refused_before_sampling(tmp_path):
    unet, schedule = tiny_unet(num_classes=None)  # 1 x 16 x 16
    model = PairGenerator(UNetDenoiser(unet, schedule), num_steps=2)
    with pytest.raises(ShapeMismatchError, match=r"\(1, 28, 28\) but the teacher UNet2DModel takes"):
        generate(tmp_path / "pairs", model=model, noise_shape=[1, 28, 28])
    assert not (tmp_path / "pairs" / MANIFEST).exists()


def test_missing_shard_and_missing_folder_are_errors(tmp_path):
    with pytest.raises(PairsError, match="does not exist"):
        PairDataset(tmp_path / "nowhere")
    with pytest.raises(PairsError, match="manifest.json is missing"):
        PairDataset(tmp_path)
    generate(tmp_path)
    (tmp_path / shard_name(0)).unlink()
    with pytest.raises(PairsError, match=f"incomplete: 2 of 3 shards present; missing {shard_name(0)}"):
        PairDataset(tmp_path)


def test_other_sampler_or_teacher_than_expected_is_an_error(tmp_path):
    generate(tmp_path)
    PairDataset(tmp_path, expect={"sampler": "ddim", "num_steps": 8, "teacher": "GaussianMixtureDenoiser"})
    with pytest.raises(PairsError, match="sampler='ddim'.*sampler='heun'"):
        PairDataset(tmp_path, expect={"sampler": "heun"})
    with pytest.raises(PairsError, match="teacher='GaussianMixtureDenoiser'.*teacher='weights/fmnist-teacher'"):
        PairDataset(tmp_path, expect={"teacher": "weights/fmnist-teacher"})
    with pytest.raises(PairsError, match="other settings.*sampler: 'ddim' on disk vs 'heun' now"):
        generate(tmp_path, model=toy_generator(sampler="heun"))  # never mixes two samplers in one folder


def toy_pairs_yaml(out_dir: Path, num_pairs: int, shard_size: int, batch_size: int, trainer_extra: str = "") -> str:
    """A `dmd pairs` config with the exact 2-D mixture teacher (fast, unconditional)."""
    return f"""
trainer: {{accelerator: cpu, devices: 1, logger: false{trainer_extra}}}
model:
  class_path: dmd_lightning.data.generation.PairGenerator
  init_args:
    teacher:
      class_path: dmd_lightning.toy2d.mixture.GaussianMixtureDenoiser
      init_args: {{schedule: {{class_path: dmd_lightning.VPSchedule}}}}
    num_steps: 8
data:
  class_path: dmd_lightning.data.generation.PairGenerationDataModule
  init_args: {{out_dir: {out_dir}, num_pairs: {num_pairs}, shard_size: {shard_size}, noise_shape: [2],
              num_classes: null, batch_size: {batch_size}, seed: 3}}
"""


def run_dmd_pairs(config: Path, text: str):
    config.write_text(text)
    out = subprocess.run(["dmd", "pairs", "--config", str(config)], capture_output=True, text=True, cwd=config.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Predicting" in out.stdout + out.stderr  # Lightning's progress bar


def test_dmd_pairs_command_with_the_toy_teacher(tmp_path):
    run_dmd_pairs(tmp_path / "pairs.yaml", toy_pairs_yaml(tmp_path / "pairs", 25, 10, 4))
    generate(tmp_path / "in_process")
    assert torch.equal(PairDataset(tmp_path / "pairs").x[:], PairDataset(tmp_path / "in_process").x[:])


def test_dmd_pairs_command_with_a_class_conditional_unet(tmp_path):
    unet, _ = tiny_unet(num_classes=10)
    unet.save_pretrained(tmp_path / "teacher" / "unet")
    DDPMScheduler().save_pretrained(tmp_path / "teacher" / "scheduler")
    run_dmd_pairs(tmp_path / "pairs.yaml", f"""
trainer: {{accelerator: cpu, devices: 1, logger: false}}
model:
  class_path: dmd_lightning.data.generation.PairGenerator
  init_args:
    teacher:
      class_path: dmd_lightning.PretrainedUNetDenoiser
      init_args: {{path: {tmp_path / 'teacher'}}}
    num_steps: 2
    guidance_scale: 2.0
data:
  class_path: dmd_lightning.data.generation.PairGenerationDataModule
  init_args: {{out_dir: {tmp_path / 'pairs'}, num_pairs: 12, shard_size: 8, noise_shape: [1, 16, 16],
              num_classes: 10, batch_size: 4, dtype: float16}}
""")
    data = PairDataset(tmp_path / "pairs", expect={"teacher": str(tmp_path / "teacher"), "guidance_scale": 2.0})
    assert data.x.dtype == torch.float16 and data.x.shape == (12, 1, 16, 16)
    assert data.cond.tolist() == [i % 10 for i in range(12)] and torch.equal(data[3]["pair_cond"], torch.tensor(3))
    teacher = PretrainedUNetDenoiser(tmp_path / "teacher").eval()
    noise = torch.stack([item_noise(0, i, [1, 16, 16]) for i in range(4)])
    expected = sample_ode(teacher, noise, make_scheduler("ddim", teacher.schedule.config), 2, data.cond[:4], 2.0)
    torch.testing.assert_close(data.x[:4].float(), expected, atol=2e-3, rtol=2e-3)


class SIGKILLAtBatch(Callback):
    """Kills its own process after `batch` prediction batches, before the writer stores the last one."""

    def __init__(self, batch: int):
        self.batch = batch

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx + 1 >= self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


def test_sigkilled_dmd_pairs_rerun_ends_with_exactly_the_requested_pairs(tmp_path):
    def dmd_pairs(kill: str):
        yaml = toy_pairs_yaml(tmp_path / "pairs", 45, 3, 2, ", enable_progress_bar: false" + kill)
        (tmp_path / "pairs.yaml").write_text(yaml)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
        return subprocess.run(["dmd", "pairs", "--config", str(tmp_path / "pairs.yaml")], capture_output=True,
                              text=True, cwd=tmp_path, env=env)

    out = dmd_pairs(", callbacks: [{class_path: test_data_generation.SIGKILLAtBatch, init_args: {batch: 11}}]")
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    done = sorted(p.name for p in (tmp_path / "pairs").glob("shard-*"))
    assert done == [shard_name(s) for s in range(5)]  # 11 batches of 2, 1, 2, 1, ...: shard 5 half made
    stale = tmp_path / "pairs" / f".{shard_name(7)}.tmp-999999"  # as left by a kill during a write
    stale.write_bytes(b"partial")
    with pytest.raises(PairsError, match="incomplete: 5 of 15 shards present; missing shard-00005"):
        PairDataset(tmp_path / "pairs")
    out = dmd_pairs("")
    assert out.returncode == 0, out.stderr[-2000:]
    noise = [line for line in out.stderr.splitlines() if any(w in line.lower() for w in (
        "warn", "tip:", "__len__", "batch indices", "workers"))]
    assert not noise, noise  # quiet by default (dmd_lightning.quiet)
    generate(tmp_path / "whole", num_pairs=45, shard_size=3, batch_size=2)
    resumed, whole = PairDataset(tmp_path / "pairs"), PairDataset(tmp_path / "whole")
    assert torch.equal(resumed.index, torch.arange(45)) and torch.equal(resumed.noise[:], whole.noise[:])
    assert torch.equal(resumed.x[:], whole.x[:])
    assert sorted(p.name for p in (tmp_path / "pairs").iterdir()) == ["manifest.json"] + [shard_name(s) for s in range(15)]
