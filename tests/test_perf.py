"""FLOPs counting, the Throughput callback's figures, and compiled training steps equal to eager ones."""

import pytest
import torch
from conftest import RandomImages, assert_same_gradients, dmd2, fit_images, teacher_v, toy_optim
from lightning import Callback, Trainer
from lightning.pytorch.callbacks import Timer as LightningTimer
from lightning.pytorch.loggers import CSVLogger
from torch._dynamo.utils import counters

from dmd_lightning import DMDModule
from dmd_lightning.data.stream import DMDDataModule
from dmd_lightning.perf import Compilation, FastMath, Throughput, Timer, compile_target, count_flops, peak_flops


def test_flops_of_a_matmul_and_of_its_backward():
    a, b = torch.randn(8, 16, requires_grad=True), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    assert count_flops(lambda: (a @ b).sum().backward()) == 2 * (2 * 8 * 16 * 4)  # forward + grad of a


def test_peak_is_known_for_cards_only_and_is_the_dense_one(monkeypatch):
    assert peak_flops(torch.device("cpu"), "bf16-mixed") is None
    cards = {"NVIDIA H200": 989.4e12, "NVIDIA H100 80GB HBM3": 989.4e12, "NVIDIA H100 PCIe": 756e12,
             "NVIDIA H200 NVL": 835e12, "NVIDIA A100-SXM4-80GB": 312e12}
    for name, dense in cards.items():  # torch's names for them; Lightning's table misses the H200's
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        assert peak_flops(torch.device("cuda", 0), "bf16-mixed") == dense, name


def module(**kw) -> DMDModule:
    return DMDModule(teacher_v(), regression_loss=None, optim=toy_optim(warmup_steps=0), **kw)


def fit(m, tmp_path, max_steps, callbacks, logger=False, precision="32-true"):
    trainer = Trainer(max_steps=max_steps, logger=logger, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, limit_val_batches=0, accelerator="cpu", callbacks=callbacks,
                      log_every_n_steps=2, enable_checkpointing=False, precision=precision)
    trainer.fit(m, datamodule=DMDDataModule(None, batch_size=4, real_images=RandomImages(), val_size=8))
    return trainer


def test_throughput_counts_an_iterations_flops_as_the_sum_of_its_passes(tmp_path):
    m = module()
    perf = Throughput()
    fit(m, tmp_path, max_steps=14, callbacks=[perf], logger=CSVLogger(tmp_path))
    # one DMD iteration at batch 4: generator forward + backward, teacher and fake score forwards (DM loss),
    # generator forward again for the fake score's samples is not needed (detached), fake score forward + backward
    x, t, cond = torch.randn(4, 1, 16, 16), torch.full((4,), 500), torch.arange(4)
    fwd = count_flops(lambda: m.teacher(x, t, cond))
    assert fwd > 0 and perf.flops_per_iteration is not None
    # forward 1x, backward ~2x the forward: generator 3, teacher 1, fake score in the DM loss 1, fake score update 3
    assert 7 * fwd <= perf.flops_per_iteration <= 9 * fwd, (perf.flops_per_iteration / fwd)
    rows = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "perf/iterations_per_s" in rows and "perf/samples_per_s" in rows and "perf/mfu" not in rows  # CPU


class FirstGradients(Callback):
    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if len(self.grads) < 2:
            self.grads.append({k: p.grad.clone() for k, p in pl_module.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("make", [module, lambda **kw: dmd2(steps=(999, 499), **kw)], ids=["dmd", "dmd2-gan-2-step"])
def test_compiled_networks_give_the_eager_losses_and_gradients(tmp_path, make):
    """DMD2's first generator update is the one with a non-zero gradient (the GAN term; the DM gradient is zero while
    the fake score is the teacher's copy), through the compiled fake score's bottleneck and a 2-step generator."""
    eager, compiled = FirstGradients(), FirstGradients()
    fit(make(), tmp_path / "eager", max_steps=2, callbacks=[eager])
    m = make(compile=Compilation("aot_eager"))
    torch.compiler.reset()
    counters.clear()
    fit(m, tmp_path / "compiled", max_steps=2, callbacks=[compiled])
    assert m._compiled and list(m.state_dict()) == list(make().state_dict())  # keys unchanged by compiling
    # every pass whole in one graph: a graph break (the GAN's features were once caught by a hook that stopped the
    # UNet with an exception) sends the UNet's forward back to eager and compiles its blocks one by one instead
    assert not counters["unimplemented"] and counters["frames"]["ok"] == counters["frames"]["total"] > 0, dict(counters)
    assert any(g.abs().sum() > 0 for g in compiled.grads[0].values())
    assert_same_gradients(eager.grads, compiled.grads)


def test_the_generator_compiles_its_denoisers_unet_with_the_configured_mode(monkeypatch):
    """The generator trains through `step` (its denoiser), not `forward`: compiling the generator itself would leave
    its training calls eager."""
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda net, **kw: compiled.append((net, kw)))
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    m = module(compile=Compilation("aot_eager", mode="reduce-overhead"))
    m.configure_model()
    assert torch._dynamo.config.recompile_limit == 32  # the four UNets share one cache of graphs (Compilation)
    assert compile_target(m.generator) is m.generator.denoiser.unet
    nets = [m.generator.denoiser.unet, m.fake_score.unet, m.teacher.unet]
    assert [net for net, _ in compiled] == nets
    assert all(kw == {"backend": "aot_eager", "mode": "reduce-overhead"} for _, kw in compiled)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_channels_last_and_tf32_give_the_default_gradients(tmp_path, precision):
    """FastMath on the CPU: the same gradients (GroupNorm with channels-last weights, in bf16 too, has had silent
    gradient bugs; TF32 changes nothing on a CPU, so this checks channels-last and that the callback leaves the
    method alone). On the CPU's kernels only: the GPU's are another matter."""
    default, fast = FirstGradients(), FirstGradients()
    fit(module(), tmp_path / "default", max_steps=2, callbacks=[default], precision=precision)
    m = module()
    fit(m, tmp_path / "fast", max_steps=2, callbacks=[fast, FastMath(tf32=True, channels_last=True)],
        precision=precision)
    assert torch.get_float32_matmul_precision() == "highest"  # the process-wide setting restored at the end
    convs = [p for p in m.generator.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
    if precision == "32-true":
        assert_same_gradients(default.grads, fast.grads)
        return
    # bf16 rounds differently in each memory layout: per parameter, a difference small next to its gradient (or,
    # where the method makes the gradient ~0, as for attention key biases, next to a typical one)
    for step, (a, b) in enumerate(zip(default.grads, fast.grads)):
        typical = torch.stack([v.norm() for v in a.values()]).median()
        for k in a:
            assert (a[k] - b[k]).norm() <= 3e-2 * a[k].norm() + 1e-2 * typical, f"{k} at step {step}"


def test_throughput_counts_flops_through_the_gans_generator_term(tmp_path):
    """The GAN's generator term runs a nested autograd.grad in its backward (gan._GradToInputOnly), where the flop
    counter's module hooks once failed on a leaf input."""
    m, perf = dmd2(), Throughput(count_iterations=1)
    fit_images(m, tmp_path, max_steps=3, callbacks=[perf])
    assert m.iteration == 2 and perf.flops_per_iteration > 0


def test_the_timer_agrees_across_ranks_on_logging_steps_only():
    """Under DDP each check of max_time is a broadcast (a host synchronisation under NCCL): batches 0, 5, 10 only
    with log_every_n_steps 5; one process checks every batch, as Lightning's Timer."""
    from types import SimpleNamespace

    checked = []
    for world_size, every in ((2, 5), (1, 5), (2, 0)):  # 0: logging off, every 50
        strategy = SimpleNamespace(broadcast=lambda stop: checked.append((world_size, batch)) or stop)
        trainer = SimpleNamespace(world_size=world_size, log_every_n_steps=every, strategy=strategy, should_stop=False)
        timer = Timer(duration="00:00:01:00")
        for batch in range(12 if every else 60):
            timer.on_train_batch_end(trainer, None, None, None, batch)
    assert checked == [(2, 0), (2, 5), (2, 10)] + [(1, b) for b in range(12)] + [(2, 0), (2, 50)]


@pytest.mark.parametrize("subcommand", [["fit"], []])
def test_dmd_uses_this_timer_for_max_time(tmp_path, monkeypatch, subcommand):
    """`--trainer.max_time` gives one Timer, this one, whether the CLI runs a subcommand or not (run=False)."""
    from pathlib import Path

    from dmd_lightning.cli import cli

    monkeypatch.chdir(Path(__file__).parents[1])
    run = cli([*subcommand, "--config", "configs/toy2d.yaml", "--trainer.default_root_dir", str(tmp_path),
               "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.max_time",
               "00:00:10:00", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
               "--data.init_args.num_pairs", "64", "--data.init_args.sampler_steps", "4"], run=bool(subcommand))
    timers = [cb for cb in run.trainer.callbacks if isinstance(cb, LightningTimer)]
    assert len(timers) == 1 and type(timers[0]) is Timer and 590 < timers[0].time_remaining() <= 600
