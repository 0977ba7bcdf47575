import csv
import math

import pytest
import torch
from conftest import assert_same_weights, dmd2, fit, fit_images, toy_module, toy_optim
from lightning import Callback
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from dmd_lightning import DMDModule, VPSchedule
from dmd_lightning.errors import NonFiniteError
from dmd_lightning.toy2d.mixture import GaussianMixtureDenoiser, MLPDenoiser, MLPGenerator
from dmd_lightning.update import NonFinite

CHECKS = ["update", "logging"]


class NaNLoss(nn.Module):
    def forward(self, pred, target):
        return (pred - target).pow(2).mean() * float("nan")


class NaNWhenTraining(MLPDenoiser):
    """A fake score whose output is NaN only when it is being trained (with grad), not inside the DM loss."""

    def forward(self, x_t, t, cond=None):
        out = super().forward(x_t, t, cond)
        return out * float("nan") if torch.is_grad_enabled() else out


def adam_state(module, index: int) -> list[torch.Tensor]:
    return [v for s in module.optimizers()[index].optimizer.state.values() for v in s.values()]


@pytest.mark.parametrize("check", CHECKS)
def test_non_finite_generator_loss_is_skipped_or_stops(tmp_path, check):
    m = toy_module(nonfinite=NonFinite(check=check))
    m.regression_loss = NaNLoss()
    g0 = [p.detach().clone() for p in m.generator.parameters()]
    fit(m, max_steps=4, tmp_path=tmp_path, log_every_n_steps=2)
    assert all(torch.equal(a, b) for a, b in zip(g0, m.generator.parameters()))
    # skipped on the device too: Adam's moments and step count untouched
    assert all(not v.any() for v in adam_state(m, 0)), adam_state(m, 0)
    m = toy_module(nonfinite=NonFinite(action="stop", check=check))
    m.regression_loss = NaNLoss()
    where = "generator update at iteration 1" if check == "update" else "2 generator update.* up to the generator update at iteration 2"
    with pytest.raises(NonFiniteError, match=f"regression.*{where}"):
        fit(m, max_steps=4, tmp_path=tmp_path, log_every_n_steps=2)


@pytest.mark.parametrize("check", CHECKS)
def test_non_finite_fake_score_loss_is_skipped_or_stops(tmp_path, check):
    def module(action):
        schedule = VPSchedule()
        return DMDModule(GaussianMixtureDenoiser(schedule), MLPGenerator(hidden=32),
                         NaNWhenTraining(schedule, hidden=32), optim=toy_optim(),
                         nonfinite=NonFinite(action=action, check=check))

    m = module("skip")
    f0 = [p.detach().clone() for p in m.fake_score.parameters()]
    g0 = [p.detach().clone() for p in m.generator.parameters()]
    fit(m, max_steps=4, tmp_path=tmp_path, log_every_n_steps=2)
    assert all(torch.equal(a, b) for a, b in zip(f0, m.fake_score.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(g0, m.generator.parameters()))  # the generator still trains
    where = (r"in the fake_score update at iteration 1 \(global step 1\)" if check == "update"
             else "in the 2 fake_score update.* up to the end of training")  # 4 steps, all counted: 2 iterations, none logged
    with pytest.raises(NonFiniteError, match=f"denoising, gradient {where}"):
        fit(module("stop"), max_steps=4, tmp_path=tmp_path, log_every_n_steps=3)


def test_too_many_skips_stop_at_a_logging_step(tmp_path):
    m = toy_module(nonfinite=NonFinite(check="logging", max_consecutive=3))
    m.regression_loss = NaNLoss()
    with pytest.raises(NonFiniteError, match="4 consecutive updates skipped"):
        fit(m, max_steps=40, tmp_path=tmp_path, log_every_n_steps=4)
    assert m.iteration == 4  # read at the first logging step, after 4 skipped updates (3 were enough)


def test_checks_train_alike_when_all_is_finite(tmp_path):
    runs = []
    for check in CHECKS:
        torch.manual_seed(0)
        m = toy_module(nonfinite=NonFinite(check=check))
        fit(m, max_steps=6, tmp_path=tmp_path / check, log_every_n_steps=2)
        runs.append(m)
    assert_same_weights(runs[0], runs[1], rtol=0, atol=0)


class HostReads(Callback):
    """Per iteration of a fit: whether a tensor's value was read on the host (a device synchronisation), anywhere in
    Lightning's loop, from the batch's start to the next one's (the progress bar's metric updates included)."""

    METHODS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__")

    def __init__(self):
        self.reads: dict[int, int] = {}
        self._iteration, self._saved = 0, {}

    def on_train_start(self, trainer, pl_module):
        self._saved = {k: getattr(torch.Tensor, k) for k in self.METHODS}
        for k in self.METHODS:
            setattr(torch.Tensor, k, self._recording(k))

    def _recording(self, name):
        def method(t, *args):
            self.reads[self._iteration] = self.reads.get(self._iteration, 0) + 1
            return self._saved[name](t, *args)
        return method

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._iteration = pl_module.iteration + 1
        self.reads.setdefault(self._iteration, 0)

    def on_train_end(self, trainer, pl_module):
        for k, v in self._saved.items():
            setattr(torch.Tensor, k, v)

    def on_exception(self, trainer, pl_module, exception):
        self.on_train_end(trainer, pl_module)


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("model", ["toy", "dmd2 4-step"])
def test_logging_check_reads_nothing_between_logging_steps(tmp_path, check, model):
    """In the whole training loop, with the progress bar on; also DMD2 with the GAN and a 4-step generator, whose
    step index per update is drawn on the host."""
    m = toy_module(nonfinite=NonFinite(check=check)) if model == "toy" else dmd2(
        steps=(999, 749, 499, 249), nonfinite=NonFinite(check=check))
    reads = HostReads()
    if model == "toy":
        fit(m, max_steps=12, tmp_path=tmp_path, log_every_n_steps=3, callbacks=[reads], enable_progress_bar=True)
    else:  # 6 iterations: generator + fake, fake, ...
        fit_images(m, tmp_path, max_steps=9, log_every_n_steps=3, callbacks=[reads], enable_progress_bar=True)
    assert sorted(reads.reads) == [1, 2, 3, 4, 5, 6]
    if check == "update":  # the control: a verdict read after every update
        assert all(reads.reads.values()), reads.reads
    else:
        assert all(bool(n) == (iteration % 3 == 0) for iteration, n in reads.reads.items()), reads.reads


class GradNorms(Callback):
    def __init__(self):
        self.norms = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.norms.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith("/grad_norm")})


def test_16_mixed_clips_and_checks_unscaled_gradients_and_the_loss_scale_backs_off(tmp_path):
    """Under 16-mixed (a torch.amp.GradScaler, here on the CPU) the gradients are unscaled before clipping and the
    guard; an overflowing generator update is skipped by both, and GradScaler lowers its scale until it fits."""
    runs = {}
    for name, kw in {"32-true": {"precision": "32-true"},
                     "16-mixed": {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}}.items():
        torch.manual_seed(0)
        m, norms = toy_module(), GradNorms()
        trainer = fit(m, max_steps=40, tmp_path=tmp_path / name, callbacks=[norms], log_every_n_steps=1, **kw)
        runs[name] = (m, norms.norms, trainer)
    fp32, fp16 = runs["32-true"][1][0]["fake_score/grad_norm"], runs["16-mixed"][1][0]["fake_score/grad_norm"]
    assert fp16 == pytest.approx(fp32, rel=1e-2)  # not 65536 times larger
    m, norms, trainer = runs["16-mixed"]
    assert trainer.precision_plugin.scaler.get_scale() < 65536.0
    assert math.isfinite(norms[-1]["generator/grad_norm"])


class NaNValue(nn.Module):
    """A loss whose value is NaN while its gradient is finite."""

    def forward(self, pred, target):
        return (pred - target).pow(2).mean() + torch.tensor(float("nan"))


@pytest.mark.parametrize("check", CHECKS)
def test_16_mixed_skips_a_non_finite_loss_term_whose_gradient_is_finite(tmp_path, check):
    """GradScaler decides a fused step from the gradients alone: a non-finite loss term with finite gradients
    must still leave the weights and Adam's state alone (a loss scale of 1, so no gradient overflows)."""
    m = toy_module(nonfinite=NonFinite(check=check))
    m.regression_loss = NaNValue()
    g0 = [p.detach().clone() for p in m.generator.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    fit(m, max_steps=8, tmp_path=tmp_path, log_every_n_steps=2, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    assert all(torch.equal(a, b) for a, b in zip(g0, m.generator.parameters()))
    assert all(not v.any() for v in adam_state(m, 0))


def test_every_network_is_logged_when_the_generator_turn_misses_the_logging_iterations(tmp_path):
    """Two fake-score updates per generator update, logging every 2nd iteration: the generator updates at iterations
    1, 3, 5 and Lightning writes at 2, 4, 6. Each logging iteration carries the generator's latest update (loss
    terms, gradient norm, lr, DM statistics), once, and the fake score's."""
    from lightning.pytorch.loggers import CSVLogger

    fit_images(dmd2(), tmp_path, max_steps=9, log_every_n_steps=2, logger=CSVLogger(tmp_path, name="log"))
    rows = list(csv.DictReader(open(next(tmp_path.glob("log/version_*/metrics.csv")))))
    logged = {k: [float(r["train/iteration"]) for r in rows if r.get(k)] for k in rows[0]}
    for k in ("generator/loss_dm", "generator/loss_gan", "generator/grad_norm", "generator/lr", "generator/skipped",
              "dm/weight_mean", "fake_score/loss_denoising", "fake_score/loss_classifier", "fake_score/grad_norm"):
        assert logged[k] == [2.0, 4.0, 6.0], (k, logged[k])


def test_generator_skips_are_read_at_the_first_logging_iteration_after_them(tmp_path):
    m = toy_module(nonfinite=NonFinite(action="stop", check="logging"), fake_updates_per_generator_update=2)
    m.regression_loss = NaNLoss()
    with pytest.raises(NonFiniteError, match="1 generator update.* up to the generator update at iteration 1 "):
        fit(m, max_steps=40, tmp_path=tmp_path, log_every_n_steps=2)
    assert m.iteration == 2
