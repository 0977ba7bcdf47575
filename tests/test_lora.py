"""LoRA generator and fake score (dmd_lightning.lora): only adapters train, the frozen base stays the teacher's;
exact resume; the adapters alone load into a fresh LoRADenoiser; two gloo ranks equal one process; the SD export
as diffusers' LoRA file and as a merged pipeline, both sampling as the generator; configs/sd15_lora.yaml."""

import copy

import pytest
import torch
from conftest import (
    PROMPTS,
    assert_same_weights,
    cli_on_tiny,
    embed,
    fit_images,
    teacher_v,
    tiny_unet,
    toy_optim,
    two_ranks_match_one_process,
)

from dmd_lightning import DMDModule, GANLoss, UNetDenoiser, VPSchedule
from dmd_lightning.checkpoint import ModelCheckpoint
from dmd_lightning.generator import OneStepGenerator
from dmd_lightning.lora import LoRADenoiser, is_lora, merged


def tiny_text_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)


def lora_dmd2(fake_lora: bool = True, **kw) -> DMDModule:
    """DMD2 (GAN, real images) on the tiny v-prediction teacher: LoRA generator, LoRA or full fake score."""
    t = teacher_v()
    generator = OneStepGenerator(LoRADenoiser(copy.deepcopy(t), rank=4, alpha=8))
    fake = LoRADenoiser(copy.deepcopy(t), rank=4, alpha=8) if fake_lora else None
    args = dict(regression_loss=None, gan=GANLoss(generator_weight=3e-3, classifier_weight=1e-2),
                optim=toy_optim(warmup_steps=0), fake_updates_per_generator_update=2)
    return DMDModule(t, generator, fake, **{**args, **kw})


def base_weights(net: torch.nn.Module) -> dict:
    """The weights under the adapters, named as in the network before LoRA."""
    return {k.replace("base_layer.", ""): v for k, v in net.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("text", [False, True], ids=["UNet2DModel", "UNet2DConditionModel"])
def test_only_adapters_require_grad_and_training_starts_at_the_base(text):
    if text:
        base, cond, x = UNetDenoiser(tiny_text_unet(), VPSchedule()), torch.randn(2, 5, 16), torch.randn(2, 4, 8, 8)
        adapted = {"to_q", "to_out.0", "proj_in", "ff.net.2", "conv1", "conv_shortcut", "time_emb_proj",
                   "downsamplers.0.conv", "upsamplers.0.conv"}
    else:
        base, cond, x = UNetDenoiser(*tiny_unet()), torch.tensor([1, 2]), torch.randn(2, 1, 16, 16)
        adapted = {"to_q", "to_out.0", "conv1", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv",
                   "upsamplers.0.conv"}
    reference = copy.deepcopy(base)
    lora = LoRADenoiser(base, rank=4, alpha=8)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    names = {n.rsplit(".lora_A.", 1)[0] for n in trainable if ".lora_A." in n}
    assert {a for a in adapted if any(n.endswith("." + a) for n in names)} == adapted
    assert not any(n.endswith(("conv_in", "conv_out")) for n in names)
    t = torch.tensor([10, 900])
    assert torch.equal(lora(x, t, cond), reference(x, t, cond))  # B = 0: the teacher's output exactly
    assert lora.schedule is base.schedule and lora.text_conditional == text and is_lora(lora)
    assert base_weights(lora.unet).keys() == reference.unet.state_dict().keys()


def test_a_lora_generator_trains_its_adapters_only(tmp_path):
    m = lora_dmd2()
    frozen = {k: v.clone() for k, v in m.teacher.unet.state_dict().items()}
    start = {k: v.clone() for k, v in m.state_dict().items()}
    trainer = fit_images(m, tmp_path, max_steps=6)
    for net in (m.generator.denoiser.unet, m.fake_score.unet, m.generator_ema.denoiser.unet):
        for k, v in base_weights(net).items():
            assert torch.equal(v, frozen[k]), k
    moved = [k for k, v in m.state_dict().items() if not torch.equal(v, start[k])]
    assert any(k.startswith("generator.") and ".lora_B." in k for k in moved)
    assert any(k.startswith("fake_score.") and ".lora_B." in k for k in moved)
    assert all(".lora_" in k for k in moved if k.startswith(("generator.", "fake_score.", "generator_ema.")))
    opt_g, opt_f = trainer.optimizers  # AdamW keeps state for the adapters only (frozen weights get no grad)
    lora_g = [p for n, p in m.generator.named_parameters() if ".lora_" in n]
    assert len(opt_g.state) == len(lora_g) and all(p in opt_g.state for p in lora_g)


def test_resume_continues_exactly_from_checkpoints_without_the_frozen_base(tmp_path):
    torch.manual_seed(0)
    straight = lora_dmd2()
    fit_images(straight, tmp_path / "a", max_steps=9)
    torch.manual_seed(0)
    first = lora_dmd2()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True, every_n_train_steps=100)
    fit_images(first, tmp_path / "b", max_steps=4, callbacks=[ckpt])
    saved = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)["state_dict"]
    trained = [k for k in saved if k.startswith(("generator.", "generator_ema.", "fake_score."))]
    assert trained and all("lora_" in k for k in trained if k.endswith("weight") and "norm" not in k), trained[:3]
    torch.manual_seed(0)
    resumed = lora_dmd2()
    fit_images(resumed, tmp_path / "b", max_steps=9, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert_same_weights(straight, resumed)


def test_the_adapters_alone_load_into_a_fresh_lora_denoiser(tmp_path):
    m = lora_dmd2(fake_lora=False)
    fit_images(m, tmp_path, max_steps=3)
    trained = m.generator.denoiser
    state = trained.lora_state_dict()
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    fresh = LoRADenoiser(teacher_v(), rank=4, alpha=8)
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([999, 999]), torch.tensor([3, 4])
    assert not torch.equal(fresh(x, t, y), trained(x, t, y))
    fresh.load_lora_state_dict(state)
    assert torch.equal(fresh(x, t, y), trained(x, t, y))
    with pytest.raises(ValueError, match="not this LoRA"):
        fresh.load_lora_state_dict({**state, "down_blocks.9.conv1.lora_A.weight": torch.zeros(1)})
    plain = UNetDenoiser(merged(trained.unet), trained.schedule)  # merged: the plain UNet, adapters added in
    assert not is_lora(plain) and set(plain.unet.state_dict()) == set(m.teacher.unet.state_dict())
    torch.testing.assert_close(plain(x, t, y), trained(x, t, y), rtol=1e-4, atol=1e-4)


def test_two_gloo_ranks_match_one_process(tmp_path):
    """The all-reduced adapter gradients of the first generator and fake-score updates (as test_ddp.py)."""
    single = two_ranks_match_one_process(tmp_path, make=lora_dmd2)
    names = [n for grads in single for n in grads]
    assert any(n.startswith("generator.") for n in names) and any(n.startswith("fake_score.") for n in names)
    assert all(".lora_" in n for n in names if n.startswith(("generator.", "fake_score.")))


def test_sd_export_writes_a_diffusers_lora_and_merged_weights(sd, teacher, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from dmd_lightning.cli import DMDTrainer
    from dmd_lightning.sd.model import decode_latents, load_vae

    m = DMDModule(teacher, OneStepGenerator(LoRADenoiser(copy.deepcopy(teacher), rank=4, alpha=8)))
    with torch.no_grad():  # trained adapters stand-in: B != 0
        for n, p in m.generator_ema.named_parameters():
            if ".lora_" in n:
                p.add_(0.1 * torch.randn_like(p))
    DMDTrainer(logger=False).export(m, out_dir=str(tmp_path / "export"))
    assert (tmp_path / "export" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    teacher_unet = UNet2DConditionModel.from_pretrained(sd["pipe"], subfolder="unet")  # the teacher's own pipeline:
    pipes = [StableDiffusionPipeline.from_pretrained(str(tmp_path / "export")),  # its vae, text encoder, tokenizer
             StableDiffusionPipeline.from_pretrained(str(tmp_path / "export"), unet=teacher_unet)]
    pipes[1].load_lora_weights(str(tmp_path / "export" / "lora"))
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        x = m.sample(z, embed(sd, PROMPTS[:2]))
        expected = (decode_latents(load_vae(sd["pipe"]), x) / 2 + 0.5).clamp(0, 1)
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
        out = pipe(PROMPTS[:2], num_inference_steps=1, guidance_scale=1.0, latents=z, output_type="pt").images
        torch.testing.assert_close(out, expected, atol=5e-3, rtol=0)
    assert "load_lora_weights" in (tmp_path / "export" / "README.md").read_text()


def test_sd15_lora_config_fits_and_exports_with_the_tiny_pipeline(sd, tmp_path):
    """configs/sd15_lora.yaml as is, but for paths and sizes (the tiny pipeline stands in for the hub id)."""
    from dmd_lightning.cli import cli

    sd_args = {"path": sd["pipe"], "embedding_cache": sd["cache"]}
    model = {"teacher": {"init_args": sd_args}, "evaluator": None,
             "generator": {"init_args": {"denoiser": {"init_args": {"rank": 4, "denoiser": {"init_args": sd_args}}}}}}
    data = {"prompts": sd["prompts"], "text_encoder": sd["pipe"], "embedding_cache": sd["cache"], "batch_size": 1,
            "val_prompts": None, "latent_shape": [4, 8, 8]}
    run, args = cli_on_tiny("configs/sd15_lora.yaml", tmp_path, 3, model, data)
    m = run.model
    assert isinstance(m.generator.denoiser, LoRADenoiser) and m.generator.denoiser.lora_config.lora_alpha == 8
    assert m.optim.generator_lr == 5e-5 and m.iteration == 2 and not is_lora(m.fake_score)
    assert all(".lora_" in n for n, p in m.generator.named_parameters() if p.requires_grad)
    run.trainer.save_checkpoint(tmp_path / "last.ckpt")
    cli(["export", *args, "--ckpt_path", str(tmp_path / "last.ckpt"), "--out_dir", str(tmp_path / "export")])
    assert (tmp_path / "export" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "export" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
