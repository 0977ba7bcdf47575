import contextlib
import warnings

import pytest
import torch
from conftest import assert_same_weights, fit, tiny_unet, toy_module, toy_optim
from lightning import Trainer

from dmd_lightning import DenoisingLoss, DMDModule, DMLoss, L2Loss, UNetDenoiser, VPSchedule
from dmd_lightning.errors import NonFiniteError
from dmd_lightning.metrics.evaluation import Evaluator
from dmd_lightning.optim import lr_factor
from dmd_lightning.toy2d.mixture import GaussianMixtureDenoiser, MLPDenoiser, MLPGenerator, ToyDataModule


def test_generator_and_fake_score_start_as_copies_of_the_frozen_teacher():
    unet, schedule = tiny_unet()
    teacher = UNetDenoiser(unet, schedule)
    m = DMDModule(teacher)
    assert not any(p.requires_grad for p in m.teacher.parameters())
    assert all(p.requires_grad for p in m.generator.parameters())
    assert all(p.requires_grad for p in m.fake_score.parameters())
    z, y = torch.randn(2, 1, 16, 16), torch.tensor([1, 2])
    t_last = torch.full((2,), schedule.T - 1)
    # x0 at T-1 multiplies float noise of the epsilon output by sigma/alpha ~ 157: compare in epsilon space
    eps = lambda x0: schedule.from_x0(x0, z, t_last)  # noqa: E731
    torch.testing.assert_close(eps(m.generator(z, y)), eps(teacher(z, t_last, y)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps(m.fake_score(z, t_last, y)), eps(teacher(z, t_last, y)), rtol=1e-5, atol=1e-5)
    assert m.generator.denoiser.unet is not unet and m.fake_score.unet is not unet


@pytest.mark.parametrize("ratio", [1, 3])
def test_two_time_scale_rule_counts_updates(tmp_path, ratio):
    m = toy_module(fake_updates_per_generator_update=ratio)
    g0 = [p.detach().clone() for p in m.generator.parameters()]
    trainer = fit(m, max_steps=2 * ratio + 2 * ratio - 2 + 2, tmp_path=tmp_path)
    opt_g, opt_f = trainer.optimizers
    steps = lambda opt: int(next(iter(opt.state.values()))["step"])  # noqa: E731
    assert steps(opt_f) == m.iteration
    assert steps(opt_g) == (m.iteration + ratio - 1) // ratio
    assert trainer.global_step == steps(opt_g) + steps(opt_f)  # max_steps counts both optimizers
    assert any(not torch.equal(a, b) for a, b in zip(g0, m.generator.parameters()))


def test_checkpoint_holds_both_optimizers_schedulers_ema_and_the_update_phase(tmp_path):
    m = toy_module(fake_updates_per_generator_update=2)
    trainer = fit(m, max_steps=7, tmp_path=tmp_path)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["dmd_iteration"] == m.iteration == 5
    assert len(ckpt["optimizer_states"]) == 2 and len(ckpt["lr_schedulers"]) == 2
    assert any(k.startswith("generator_ema.") for k in ckpt["state_dict"])
    m2 = toy_module(fake_updates_per_generator_update=2)
    fit(m2, max_steps=9, tmp_path=tmp_path, ckpt_path=tmp_path / "last.ckpt")
    assert m2.iteration == 6


def test_ablations_skip_the_networks_they_do_not_use(tmp_path):
    regression_only = toy_module(dm_loss=DMLoss(weight=0.0))
    f0 = [p.detach().clone() for p in regression_only.fake_score.parameters()]
    fit(regression_only, max_steps=3, tmp_path=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(f0, regression_only.fake_score.parameters()))
    assert regression_only.iteration == 3


def test_a_run_with_logging_off_trains(tmp_path):
    """log_every_n_steps 0 is Lightning's "never log": the steps that ride on logging (the module's logs, the
    throughput's timing) fall every 50 batches instead of dividing by zero."""
    from dmd_lightning.perf import Throughput

    m = toy_module()
    fit(m, max_steps=4, tmp_path=tmp_path, log_every_n_steps=0, callbacks=[Throughput()])
    assert m.iteration == 2


def test_no_checkpoint_with_non_finite_weights(tmp_path):
    m = toy_module()
    trainer = fit(m, max_steps=2, tmp_path=tmp_path)
    with torch.no_grad():
        next(m.generator.parameters()).fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="generator has non-finite weights"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


def test_generator_reads_noise_at_the_last_timestep_and_optimizers_are_fused():
    unet, schedule = tiny_unet()
    m = DMDModule(UNetDenoiser(unet, schedule))
    assert m.generator.timestep == schedule.T - 1 and m.generator_ema.timestep == schedule.T - 1
    opt_g, opt_f = m.configure_optimizers()[0]
    assert opt_g.defaults["fused"] and opt_f.defaults["fused"]  # CPU tensors take the fused AdamW


class MeanOfSamples(Evaluator):
    def reset(self):
        self.parts = []

    def update(self, samples, batch):
        self.parts.append(samples)

    def compute(self):
        return {"mean": float(torch.cat(self.parts).mean())}


def test_validation_scores_the_ema_generator_and_optionally_the_raw_one(tmp_path):
    m = toy_module(evaluator=MeanOfSamples(), validate_raw=True)
    with torch.no_grad():
        for p in m.generator.parameters():
            p.add_(0.5)  # raw and EMA generators now differ
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                      default_root_dir=tmp_path)
    dm = ToyDataModule(batch_size=32, pair_batch_size=16, num_pairs=64, sampler_steps=10)
    metrics = trainer.validate(m, datamodule=dm, verbose=False)[0]
    dm.setup("validate")
    z = torch.cat([b["z"] for b in dm.val_dataloader()])
    assert metrics["val/mean"] == pytest.approx(float(m.sample(z, ema=True).mean()), rel=1e-5)
    assert metrics["val/raw/mean"] == pytest.approx(float(m.sample(z, ema=False).mean()), rel=1e-5)
    assert metrics["val/mean"] != pytest.approx(metrics["val/raw/mean"])
    assert "val/raw/mean" not in Trainer(logger=False, enable_progress_bar=False, accelerator="cpu").validate(
        toy_module(evaluator=MeanOfSamples()), datamodule=dm, verbose=False)[0]


def test_warns_when_the_dm_loss_reaches_timesteps_of_large_x0_error_gain():
    unet, schedule = tiny_unet()  # epsilon prediction on the linear schedule: sigma/alpha = 130 at 0.98T
    with pytest.warns(UserWarning, match="DM loss reaches t = 980"):
        DMDModule(UNetDenoiser(unet, schedule))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DMDModule(UNetDenoiser(unet, schedule), dm_loss=DMLoss(t_range=(0.02, 0.5)))
    assert not [w for w in caught if "DM loss" in str(w.message)]


def test_checkpoints_leave_out_the_frozen_teacher_and_loading_puts_it_back():
    unet, schedule = tiny_unet()
    m = DMDModule(UNetDenoiser(unet, schedule), regression_loss=L2Loss())
    with torch.no_grad():
        next(m.generator.parameters()).add_(1.0)
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    assert any(k.startswith("fake_score.") for k in ckpt["state_dict"])
    m2 = DMDModule(UNetDenoiser(unet, schedule), regression_loss=L2Loss())
    m2.on_load_checkpoint(ckpt)
    m2.load_state_dict(ckpt["state_dict"])  # strict: the teacher's keys are back
    for a, b in zip(m.generator.parameters(), m2.generator.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("warmup", [True, False])
def test_generator_ema_warms_up_unless_told_not_to(tmp_path, warmup):
    m = toy_module(ema_decay=0.99, ema_warmup=warmup)
    ema0 = [p.detach().clone() for p in m.generator_ema.parameters()]
    fit(m, max_steps=2, tmp_path=tmp_path)  # one iteration: one generator update (decay 0.1 when warming up)
    decay = 0.1 if warmup else 0.99
    for e0, e, g in zip(ema0, m.generator_ema.parameters(), m.generator.parameters()):
        torch.testing.assert_close(e, decay * e0 + (1 - decay) * g, rtol=1e-5, atol=1e-6)


def test_lr_factor_warms_up_then_stays_or_follows_a_half_cosine():
    assert [lr_factor(s, 4) for s in (0, 1, 3, 10)] == [0.25, 0.5, 1.0, 1.0]
    assert lr_factor(3, 4, decay_steps=14) == 1.0  # warm-up's end
    assert lr_factor(9, 4, decay_steps=14, min_ratio=0.1) == pytest.approx(0.55)  # half way: the mean of 1 and 0.1
    assert lr_factor(14, 4, decay_steps=14, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(100, 4, decay_steps=14, min_ratio=0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="lr_decay"):
        toy_module(optim=dict(lr_decay="linear"))


@pytest.mark.parametrize("ratio", [1, 3])
def test_cosine_decay_ends_both_networks_at_the_floor_at_max_steps(tmp_path, ratio):
    m = toy_module(optim=dict(lr_decay="cosine", min_lr_ratio=0.1), fake_updates_per_generator_update=ratio)
    fit(m, max_steps=8 * (1 + ratio), tmp_path=tmp_path)  # 8 generator updates, 8 * ratio fake-score updates
    assert m.iteration == 8 * ratio
    for opt, lr in zip(m.optimizers(), (1e-3, 1e-3)):
        assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * lr)
    half = toy_module(optim=dict(lr_decay="cosine", decay_steps=16, min_lr_ratio=0.1),
                      fake_updates_per_generator_update=ratio)
    fit(half, max_steps=8 * (1 + ratio), tmp_path=tmp_path)  # decay_steps over max_steps: not at the floor yet
    for opt in half.optimizers():
        assert 0.5 < opt.optimizer.param_groups[0]["lr"] / 1e-3 < 0.7


def test_fake_score_learns_at_its_own_t_range(tmp_path):
    seen = []

    class Recorded(DenoisingLoss):  # the configured loss, as a user's own subclass would be injected
        def __call__(self, fake, x, cond, t, eps):
            seen.append(t)
            return super().__call__(fake, x, cond, t, eps)

    m = toy_module(fake_loss=Recorded(t_range=(0.2, 0.3)))
    fit(m, max_steps=6, tmp_path=tmp_path)
    t = torch.cat(seen)
    lo, hi = m.fake_score.schedule.t_bounds(0.2, 0.3)
    assert len(seen) == 3 and lo <= int(t.min()) and int(t.max()) <= hi and hi < m.fake_score.schedule.T // 2


def test_validation_logs_a_grid_of_the_samples_to_tensorboard(tmp_path):
    from conftest import RandomImages, teacher_v
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dmd_lightning.data.stream import DMDDataModule
    from dmd_lightning.images import TeacherGrid
    from dmd_lightning.metrics.evaluation import Evaluator

    class Count(Evaluator):
        def reset(self):
            self.n = 0

        def update(self, samples, batch):
            self.n += len(samples)

        def compute(self):
            return {"n": float(self.n)}

    m = DMDModule(teacher_v(), regression_loss=None, evaluator=Count(), validate_raw=True,
                  optim=toy_optim(warmup_steps=0))
    trainer = Trainer(max_steps=4, logger=TensorBoardLogger(tmp_path), enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", val_check_interval=1, num_sanity_val_steps=0,
                      enable_checkpointing=False, callbacks=[TeacherGrid(num_steps=3)])
    trainer.fit(m, datamodule=DMDDataModule(None, batch_size=2, real_images=RandomImages(), val_size=12,
                                             val_batch_size=12))
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents*")).parent))
    events.Reload()
    assert set(events.Tags()["images"]) == {"samples/ema", "samples/raw", "samples/teacher"}
    image = events.Images("samples/ema")[-1]
    assert image.width == 8 * (16 + 2) + 2 and image.height == 2 * (16 + 2) + 2  # 12 samples of 16x16, 8 a row
    assert len(events.Images("samples/ema")) == 2 and len(events.Images("samples/teacher")) == 1  # the teacher once


def test_accumulated_micro_batches_make_the_update_of_one_batch_as_large(tmp_path):
    """optim.accumulate=2 on halves of each batch: the same weights (and EMA) as the whole batches, over updates
    of both networks and a fake-score-only update (ratio 2)."""
    from lightning import LightningDataModule
    from torch.utils.data import DataLoader

    class Batches(LightningDataModule):
        def __init__(self, batches):
            super().__init__()
            self.batches = batches

        def train_dataloader(self):
            return DataLoader(self.batches, batch_size=None)

    source = ToyDataModule(batch_size=32, pair_batch_size=16, num_pairs=64, sampler_steps=10)
    source.setup("fit")
    whole = [batch for batch, _ in zip(source.train_dataloader(), range(3))]
    halves = [{k: v.chunk(2)[i] for k, v in batch.items()} for batch in whole for i in range(2)]
    runs = {}
    for name, batches, accumulate in (("whole", whole, 1), ("halves", halves, 2)):
        torch.manual_seed(0)
        m = toy_module(optim=dict(accumulate=accumulate), fake_updates_per_generator_update=2)
        trainer = Trainer(max_steps=5, logger=False, enable_progress_bar=False, enable_model_summary=False,
                          enable_checkpointing=False, default_root_dir=tmp_path, accelerator="cpu")
        blocked = []  # backward passes without DDP's gradient all-reduce (DDPStrategy's public context manager)
        trainer.strategy.block_backward_sync = lambda: contextlib.nullcontext(blocked.append(1))
        trainer.fit(m, datamodule=Batches(batches))
        assert trainer.global_step == 5 and m.iteration == len(batches)  # 3 updates: G+F, F, G+F
        assert len(blocked) == (5 if accumulate == 2 else 0)  # every backward but each update's last micro-batch's
        runs[name] = m.state_dict()
    start = toy_module().state_dict()
    for k, v in runs["whole"].items():
        torch.testing.assert_close(runs["halves"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(v, start[k]) for k, v in runs["whole"].items() if k.startswith("generator_ema."))


@pytest.mark.parametrize("stop", ["SIGTERM", "callback"])
def test_a_stop_mid_accumulation_saves_at_the_update_boundary_and_resumes_exactly(tmp_path, stop):
    """SIGTERM, or a callback asking to stop (as max_time's Timer does), after the first of two micro-batches:
    training ends after the second, last.ckpt is written then (the accumulated gradients are not in checkpoints),
    and resuming from it continues the uninterrupted run's trajectory."""
    import os
    import signal
    from contextlib import nullcontext

    from lightning import Callback

    from dmd_lightning.checkpoint import ModelCheckpoint, Stopped

    class Stop(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 4:  # the first micro-batch of the third update
                if stop == "SIGTERM":
                    os.kill(os.getpid(), signal.SIGTERM)
                else:
                    trainer.should_stop = True

    def module():
        torch.manual_seed(0)
        return toy_module(optim=dict(accumulate=2), fake_updates_per_generator_update=2)

    straight = module()
    fit(straight, max_steps=8, tmp_path=tmp_path / "a")
    stopped = module()
    with pytest.raises(Stopped) if stop == "SIGTERM" else nullcontext():
        fit(stopped, max_steps=8, tmp_path=tmp_path / "b",
            callbacks=[Stop(), ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)])
    assert stopped.iteration == 6 and not stopped.mid_update
    assert torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)["dmd_iteration"] == 6
    resumed = module()
    fit(resumed, max_steps=8, tmp_path=tmp_path / "b", ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert_same_weights(straight, resumed)


def test_init_from_starts_from_another_runs_networks_with_fresh_optimizers(tmp_path):
    """DMD2's second SD stage: the networks (generator, EMA, fake score) of a first run, nothing else of it."""
    from lightning import Callback

    from dmd_lightning.checkpoint import ModelCheckpoint
    from dmd_lightning.errors import CheckpointError

    first = toy_module()
    fit(first, max_steps=6, tmp_path=tmp_path / "first", callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    trained = {k: v.clone() for k, v in first.state_dict().items() if k.startswith(("generator", "fake_score"))}

    class AtStart(Callback):
        def on_train_start(self, trainer, pl_module):
            self.state = {k: v.clone() for k, v in pl_module.state_dict().items() if k in trained}
            self.iteration, self.adam = pl_module.iteration, len(pl_module.optimizers()[0].optimizer.state)

    second, seen = toy_module(init_from=str(tmp_path / "last.ckpt")), AtStart()
    fit(second, max_steps=2, tmp_path=tmp_path / "second", callbacks=[seen])
    assert seen.iteration == 0 and seen.adam == 0 and set(seen.state) == set(trained)
    for k, v in trained.items():
        torch.testing.assert_close(seen.state[k], v, rtol=0, atol=0, msg=k)
    other = DMDModule(GaussianMixtureDenoiser(VPSchedule()), MLPGenerator(hidden=16), MLPDenoiser(VPSchedule()),
                      init_from=str(tmp_path / "last.ckpt"))
    with pytest.raises(CheckpointError, match="not this model's"):
        fit(other, max_steps=2, tmp_path=tmp_path / "other")


def test_init_from_continues_the_ema_and_reads_a_sharded_checkpoint(tmp_path):
    """The first run's EMA is an average already: the second run's first update moves it by 1 - decay, without the
    warm-up (which would replace it by the new generator within a few updates); its checkpoint may be a folder."""
    from dmd_lightning.checkpoint import ModelCheckpoint, ShardedCheckpointIO, load_sharded

    fit(toy_module(), max_steps=6, tmp_path=tmp_path / "first", plugins=[ShardedCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    assert (tmp_path / "last.ckpt").is_dir()
    second = toy_module(init_from=str(tmp_path / "last.ckpt"), ema_decay=0.9)
    fit(second, max_steps=1, tmp_path=tmp_path / "second")  # one generator update
    loaded = load_sharded(tmp_path / "last.ckpt")["state_dict"]
    for name, ema in second.generator_ema.state_dict().items():
        expected = 0.9 * loaded[f"generator_ema.{name}"] + 0.1 * second.generator.state_dict()[name]
        torch.testing.assert_close(ema, expected, msg=name)
