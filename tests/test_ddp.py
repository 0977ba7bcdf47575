"""Two gloo processes train the toy to the same parameters, equal to one process with the global batch."""

import pytest
import torch
from conftest import toy_optim
from lightning import Callback, Trainer, seed_everything

from dmd_lightning import DMDModule, L2Loss, VPSchedule
from dmd_lightning.toy2d.mixture import GaussianMixtureDenoiser, MLPDenoiser, MLPGenerator, ToyDataModule


class SaveParameters(Callback):
    """Each rank writes its parameters and optimizer step counts when training ends."""

    def __init__(self, folder):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.folder / f"rank{trainer.global_rank}-of-{trainer.world_size}.pt")


def train(tmp_path, devices: int, batch: int, strategy: str = "auto", steps: int = 9, accumulate: int = 1):
    seed_everything(0)
    schedule = VPSchedule()
    module = DMDModule(GaussianMixtureDenoiser(schedule), MLPGenerator(hidden=32), MLPDenoiser(schedule, hidden=32),
                       regression_loss=L2Loss(), optim=toy_optim(generator_lr=1e-2, fake_lr=1e-2, accumulate=accumulate),
                       fake_updates_per_generator_update=2, ema_decay=0.5)
    data = ToyDataModule(batch_size=batch, pair_batch_size=batch // 2, num_pairs=64, sampler_steps=10)
    trainer = Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      limit_val_batches=0, default_root_dir=tmp_path, callbacks=[SaveParameters(tmp_path)])
    trainer.fit(module, datamodule=data)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_two_gloo_ranks_match_one_process_with_the_global_batch(tmp_path, accumulate):
    """With accumulate=2 the ranks reduce their gradients once per update, after two micro-batches each."""
    train(tmp_path, devices=2, batch=16, strategy="ddp_spawn_find_unused_parameters_true", accumulate=accumulate)
    train(tmp_path, devices=1, batch=32, accumulate=accumulate)
    rank0, rank1, single = (torch.load(tmp_path / f, weights_only=True)
                            for f in ("rank0-of-2.pt", "rank1-of-2.pt", "rank0-of-1.pt"))
    start = DMDModule(GaussianMixtureDenoiser(VPSchedule()), MLPGenerator(hidden=32),
                      MLPDenoiser(VPSchedule(), hidden=32))
    for name in single:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-5, atol=1e-6, msg=name)
    moved = [n for n in single if n.startswith(("generator.", "fake_score.", "generator_ema."))
             and not torch.equal(single[n], start.state_dict()[n])]
    assert any(n.startswith("generator.") for n in moved) and any(n.startswith("fake_score.") for n in moved)


class SaveGradients(Callback):
    """Each rank writes the (all-reduced) gradients of its first `n` optimizer steps."""

    def __init__(self, folder, n: int = 2):
        self.folder, self.n, self.grads = folder, n, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if len(self.grads) < self.n:
            self.grads.append({k: p.grad.detach().clone() for k, p in pl_module.named_parameters() if p.grad is not None})
        if len(self.grads) == self.n:
            torch.save(self.grads, self.folder / f"grads-rank{trainer.global_rank}-of-{trainer.world_size}.pt")
            self.n = -1


def train_dmd2(tmp_path, devices: int, batch: int, strategy: str = "auto", steps: int = 2, make=None):
    """DMD2 on a tiny UNet: GAN classifier, real-image stream, two-step generator with backward simulation (or the
    module `make()` builds)."""
    from conftest import RandomImages, dmd2

    from dmd_lightning.data.stream import DMDDataModule

    seed_everything(0)
    module = make() if make is not None else dmd2(steps=(999, 499))
    data = DMDDataModule(None, batch_size=batch, real_images=RandomImages(), val_size=8, val_batch_size=8)
    trainer = Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      limit_val_batches=0, default_root_dir=tmp_path, callbacks=[SaveGradients(tmp_path)])
    trainer.fit(module, datamodule=data)


def test_two_gloo_ranks_match_one_process_with_the_gan_and_real_images(tmp_path):
    """The gradients of the first generator update (DM + GAN) and fake-score update (denoising + classifier):
    after them Adam's first steps, lr x sign(g), turn rounding differences of near-zero gradients into lr-sized
    ones, so parameters are not the place to compare."""
    single = two_ranks_match_one_process(tmp_path)
    assert any(n.startswith("generator.") for n in single[0]) and any(n.startswith("classifier.") for n in single[1])


def two_ranks_match_one_process(tmp_path, make=None) -> list[dict]:
    """train_dmd2 on two gloo ranks with batch 2 each and in one process with batch 4: the same gradients; those of
    the single process."""
    train_dmd2(tmp_path, devices=2, batch=2, strategy="ddp_spawn_find_unused_parameters_true", make=make)
    train_dmd2(tmp_path, devices=1, batch=4, make=make)
    rank0, rank1, single = (torch.load(tmp_path / f"grads-{f}.pt", weights_only=True)
                            for f in ("rank0-of-2", "rank1-of-2", "rank0-of-1"))
    for step, (a, b, c) in enumerate(zip(rank0, rank1, single)):
        assert sorted(a) == sorted(c) and a, step
        for name in c:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=f"{name} at step {step}")
            torch.testing.assert_close(a[name], c[name], rtol=1e-4, atol=1e-7, msg=f"{name} at step {step}")
    return single
