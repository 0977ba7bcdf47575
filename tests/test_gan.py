"""DMD2 on a tiny UNet: the GAN classifier on the fake score's bottleneck, the real-image stream, the multi-step
generator with backward simulation; which loss reaches which network; exact resume with all of it on."""

import pytest
import torch
from conftest import assert_same_weights, dmd2, fit_images, teacher_v, tiny_unet
from lightning import Trainer

from dmd_lightning import UNetDenoiser, VPSchedule
from dmd_lightning.checkpoint import ModelCheckpoint
from dmd_lightning.data.stream import DMDDataModule
from dmd_lightning.errors import ConfigError
from dmd_lightning.gan import BottleneckClassifier, gan_classifier_loss, gan_generator_loss, unet_bottleneck
from dmd_lightning.generator import MultiStepGenerator
from dmd_lightning.losses import DMLoss
from dmd_lightning.update import GuardedUpdate


def test_classifier_reads_the_fake_scores_bottleneck_and_its_losses_are_non_saturating():
    m = dmd2()
    clf = m.classifier
    assert isinstance(clf, BottleneckClassifier)
    assert not any(p is q for p in clf.parameters() for q in m.fake_score.parameters())  # a head, not a copy
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([10, 500, 999])
    logits = clf(m.fake_score, x, t, torch.tensor([1, 2, 3]))
    assert logits.shape == (3,)
    logits.sum().backward()  # the classifier's gradient reaches the fake-score backbone (DMD2)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.fake_score.unet.mid_block.parameters())
    assert all(p.grad is None for p in m.fake_score.unet.up_blocks.parameters())  # no decoder pass
    zero = torch.zeros(4)
    torch.testing.assert_close(gan_generator_loss(zero), torch.log(torch.tensor(2.0)))
    torch.testing.assert_close(gan_classifier_loss(torch.full((4,), 20.0), torch.full((4,), -20.0)),
                               torch.tensor(0.0), atol=1e-8, rtol=0)
    for hidden in (18, 200):  # head widths that 32 or hidden // 4 groups would not divide
        assert BottleneckClassifier(m.fake_score, hidden)(m.fake_score, x, t, torch.tensor([1, 2, 3])).shape == (3,)


def text_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)


@pytest.mark.parametrize("kind", ["class labels", "centred input", "text"])
def test_the_bottleneck_is_what_a_full_pass_computes_at_the_middle_block(kind):
    """unet_bottleneck runs the UNet's encoder half by its modules: the same features as the middle block's output in
    the UNet's own forward pass, caught here by a hook."""
    torch.manual_seed(0)
    if kind == "text":
        unet, x, cond = text_unet(), torch.randn(3, 4, 8, 8), torch.randn(3, 5, 16)
    else:
        unet, x, cond = tiny_unet()[0], torch.randn(3, 1, 16, 16), torch.tensor([1, 2, 10])
        if kind == "centred input":
            unet.register_to_config(center_input_sample=True)
    denoiser, t = UNetDenoiser(unet, VPSchedule()), torch.tensor([10.0, 500.0, 999.0])
    caught = []
    unet.mid_block.register_forward_hook(lambda module, inputs, output: caught.append(output))
    denoiser(x, t, cond)
    features = unet_bottleneck(denoiser, x, t, cond)
    assert features.shape == caught[0].shape and features.shape[1] == 16
    torch.testing.assert_close(features, caught[0], rtol=0, atol=0)


def test_unets_whose_encoder_half_is_not_reproduced_are_refused():
    from diffusers import UNet2DModel

    skip = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("SkipDownBlock2D", "DownBlock2D"), layers_per_block=1, attention_head_dim=8,
                       up_block_types=("UpBlock2D", "SkipUpBlock2D"))
    with pytest.raises(ConfigError, match="skip down blocks"):
        BottleneckClassifier(UNetDenoiser(skip, VPSchedule()))
    unet = text_unet()
    unet.register_to_config(addition_embed_type="text")
    with pytest.raises(ConfigError, match="addition_embed_type text"):
        BottleneckClassifier(UNetDenoiser(unet, VPSchedule()))


def test_the_generators_term_reaches_only_the_samples_also_with_gradient_checkpointing():
    """input_gradient_only: the same gradient to x_t as a plain pass, none to the fake score or head, also when the
    fake score recomputes its activations in backward (the SD configs checkpoint)."""
    m = dmd2()
    m.fake_score.unet.enable_gradient_checkpointing()
    x, t, cond = torch.randn(3, 1, 16, 16), torch.tensor([10, 500, 999]), torch.tensor([1, 2, 3])
    grads = []
    for logits in (m.classifier, m.classifier.input_gradient_only):
        m.zero_grad(set_to_none=True)
        x_t = x.clone().requires_grad_(True)
        logits(m.fake_score, x_t, t, cond).sum().backward()
        grads.append(x_t.grad)
    assert all(p.grad is None for p in [*m.fake_score.parameters(), *m.classifier.parameters()])
    torch.testing.assert_close(grads[1], grads[0])
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("dm_loss, dm_terms", [(DMLoss(), ["dm"]), (DMLoss(weight=0.0), []),
                                                (DMLoss(use_fake_score=False), ["dm"])])
def test_each_loss_reaches_only_the_networks_it_should(tmp_path, monkeypatch, dm_loss, dm_terms):
    """Also in the GAN-only and real-score-only ablations, where the classifier and its fake score still train."""
    m = dmd2(dm_loss=dm_loss)
    seen = []
    original = GuardedUpdate.run

    def record(self, module, opt, sched, loss, terms, last, **kw):
        others = [p for p in module.parameters() if p.requires_grad and not any(
            p is q for g in opt.optimizer.param_groups for q in g["params"])]
        assert all(p.grad is None for p in others), f"{self.name}: another network holds gradients before its backward"
        original(self, module, opt, sched, loss, terms, last, **kw)
        assert all(p.grad is None for p in others), f"{self.name}'s loss reached another network"
        seen.append((self.name, sorted(terms)))

    monkeypatch.setattr(GuardedUpdate, "run", record)
    fit_images(m, tmp_path, max_steps=3)  # iteration 1: generator + fake score; iteration 2: fake score only
    assert seen == [("generator", [*dm_terms, "gan"]), ("fake_score", ["classifier", "denoising"]),
                    ("fake_score", ["classifier", "denoising"])]


def test_backward_simulation_runs_the_earlier_steps_without_gradient():
    g = MultiStepGenerator.from_teacher(teacher_v(), (999, 600, 300))
    z, cond = torch.randn(2, 1, 16, 16), torch.tensor([0, 1])
    eps = [torch.randn_like(z), torch.randn_like(z)]
    x2 = g.simulate(z, 2, cond, eps=eps)
    assert not x2.requires_grad and x2.grad_fn is None
    with torch.no_grad():  # by hand: x_0 at 999, noised to 600, x_0, noised to 300
        x0 = g.step(z, 0, cond)
        x1 = g.denoiser.schedule.add_noise(x0, eps[0], torch.full((2,), 600))
        expected = g.denoiser.schedule.add_noise(g.step(x1, 1, cond), eps[1], torch.full((2,), 300))
    torch.testing.assert_close(x2, expected)
    out = g.step(x2, 2, cond)
    out.sum().backward()  # the gradient flows through the last step only: the earlier ones made a constant input
    assert all(p.grad is not None for p in g.parameters() if p.requires_grad)
    a = g(z, cond, torch.Generator().manual_seed(3))
    b = g(z, cond, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)  # K-step sampling is repeatable from its seed


def test_multi_step_generators_refuse_regression_and_bad_timesteps():
    with pytest.raises(ConfigError, match="one-step generator"):
        dmd2(steps=(999, 499), regression_loss=torch.nn.MSELoss(), regression_weight=0.25)
    with pytest.raises(ConfigError, match="decreasing"):
        MultiStepGenerator(teacher_v(), (499, 999))


def test_a_fake_score_per_step_learns_and_guides_only_its_steps_outputs(tmp_path, monkeypatch):
    """fake_score_per_step: copy k trains on step k's samples (denoising and GAN classifier), and step k's DM and GAN
    terms read copy k; the other copies are left alone."""
    from dmd_lightning import DMDModule
    from dmd_lightning.losses import DMLoss

    m = dmd2(steps=(999, 600, 300), fake_score_per_step=True)
    assert len(m.fake_scores) == 3 and m.fake_score_of(2) is m.fake_score[2]
    for copy in m.fake_scores[1:]:
        assert_same_weights(m.fake_scores[0], copy)
    steps, read, trained = [], [], []
    generate, dm_call, step = DMDModule._generate, DMLoss.__call__, GuardedUpdate.step

    def record_step(self, *args):
        x, k = generate(self, *args)
        steps.append(k)
        return x, k

    def record_dm(self, x, teacher, fake, *args):
        read.append(next(i for i, f in enumerate(m.fake_scores) if f is fake))
        return dm_call(self, x, teacher, fake, *args)

    def record_update(self, module, *args):
        if self.name == "fake_score":
            trained.append([i for i, f in enumerate(m.fake_scores) if any(p.grad is not None for p in f.parameters())])
        step(self, module, *args)

    monkeypatch.setattr(DMDModule, "_generate", record_step)
    monkeypatch.setattr(DMLoss, "__call__", record_dm)
    monkeypatch.setattr(GuardedUpdate, "step", record_update)
    fit_images(m, tmp_path, max_steps=12)  # 12 optimizer steps: 8 iterations at ratio 2
    assert len(steps) == 8 and len(set(steps)) > 1  # the steps drawn differ between iterations
    assert read == steps[::2]  # generator updates on every other iteration, each reading its step's copy
    assert trained == [[k] for k in steps]


def test_a_fake_score_per_step_needs_a_multi_step_generator_and_one_step_per_update():
    with pytest.raises(ConfigError, match="multi-step generator"):
        dmd2(fake_score_per_step=True)
    with pytest.raises(ConfigError, match="step_draw='update'"):
        dmd2(steps=(999, 499), fake_score_per_step=True, step_draw="sample")
    with pytest.raises(ConfigError, match="'update'"):
        dmd2(steps=(999, 499), step_draw="batch")


def test_a_step_per_sample_simulates_each_row_as_its_own_step_would():
    g = MultiStepGenerator.from_teacher(teacher_v(), (999, 600, 300))
    z, cond, k = torch.randn(5, 1, 16, 16), torch.tensor([0, 1, 2, 3, 4]), torch.tensor([2, 0, 1, 2, 1])
    eps = [torch.randn_like(z), torch.randn_like(z)]
    with torch.no_grad():
        x = g.simulate(z, k, cond, eps=eps)
        out = g.step(x, k, cond)
        for i, ki in enumerate(k.tolist()):
            row = slice(i, i + 1)
            x_i = g.simulate(z[row], ki, cond[row], eps=[e[row] for e in eps])
            torch.testing.assert_close(x[row], x_i)
            torch.testing.assert_close(out[row], g.step(x_i, ki, cond[row]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x[1], z[1])  # step 0's input is the noise itself
    drawn = torch.Generator().manual_seed(5)
    eps = [torch.randn(z.shape, generator=drawn) for _ in range(2)]  # without eps: drawn from the generator given
    torch.testing.assert_close(g.simulate(z, k, cond, torch.Generator().manual_seed(5)), g.simulate(z, k, cond, eps=eps))


def test_a_step_per_sample_gives_every_update_the_steps_in_equal_shares(tmp_path, monkeypatch):
    from dmd_lightning import DMDModule

    m = dmd2(steps=(999, 499), step_draw="sample")
    drawn, generate = [], DMDModule._generate

    def record(self, *args):
        x, k = generate(self, *args)
        drawn.append(k)
        return x, k

    monkeypatch.setattr(DMDModule, "_generate", record)
    fit_images(m, tmp_path, max_steps=9)  # batch 4, two steps: each update two samples of each
    assert len(drawn) == 6 and all(torch.bincount(k, minlength=2).tolist() == [2, 2] for k in drawn)
    assert len({tuple(k.tolist()) for k in drawn}) == 2  # which samples take which step rotates between updates


@pytest.mark.parametrize("steps, kw", [((999,), {}), ((999, 499), {}), ((999, 499), {"fake_score_per_step": True}),
                                      ((999, 499), {"step_draw": "sample"})],
                         ids=["one step", "two steps", "two steps, a fake score per step", "two steps, one per sample"])
def test_resume_with_the_gan_and_the_real_image_stream_continues_exactly(tmp_path, steps, kw):
    torch.manual_seed(0)
    straight = dmd2(steps, **kw)
    fit_images(straight, tmp_path / "a", max_steps=9)
    torch.manual_seed(0)
    first = dmd2(steps, **kw)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True, every_n_train_steps=100)
    fit_images(first, tmp_path / "b", max_steps=4, callbacks=[ckpt])
    torch.manual_seed(0)
    resumed = dmd2(steps, **kw)
    fit_images(resumed, tmp_path / "b", max_steps=9, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert_same_weights(straight, resumed)


def test_the_gan_without_real_images_is_refused(tmp_path):
    from dmd_lightning.data.format import write_manifest, write_shard

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    write_shard(pairs / "shard-00000.safetensors", {"index": torch.arange(4), "noise": torch.randn(4, 1, 16, 16),
                                                    "x": torch.randn(4, 1, 16, 16), "cond": torch.arange(4)}, {})
    write_manifest(pairs, {"num_pairs": 4, "shard_size": 4, "num_shards": 1, "noise_shape": [1, 16, 16]})
    trainer = Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match="needs real images"):
        trainer.fit(dmd2(), datamodule=DMDDataModule(str(pairs), batch_size=2, pair_batch_size=2))
    trainer = Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", default_root_dir=tmp_path)
    no_real = torch.utils.data.DataLoader([{"z": torch.randn(1, 16, 16), "cond": torch.tensor(0)}] * 2, batch_size=2)
    with pytest.raises(ConfigError, match="real images in every training batch"):  # data given without a data module
        trainer.fit(dmd2(), train_dataloaders=no_real)
