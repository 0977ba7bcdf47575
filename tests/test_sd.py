"""Stable Diffusion path on a tiny random pipeline saved in diffusers' layout and loaded like real weights:
prompt files and cached embeddings, latent pairs, DMD steps with decoded-LPIPS regression, text-to-image
validation wiring, the diffusers export round trip, sd15.yaml end to end, and the offline error."""


import numpy as np
import pytest
import torch
from conftest import MAX_LEN, PROMPTS, cli_on_tiny, embed, quiet_trainer, toy_optim, write_real_images

from dmd_lightning import DMDModule, DMLoss, LPIPSLoss
from dmd_lightning.cli import DMDTrainer, cli
from dmd_lightning.data.format import item_noise
from dmd_lightning.loading import WeightsNotFoundError
from dmd_lightning.samplers import make_scheduler, sample_ode
from dmd_lightning.sd.data import (
    LatentPairDataset,
    SDDMDDataModule,
    read_prompts,
)
from dmd_lightning.sd.model import DecodedLPIPSLoss, PromptEmbeddings, SDDenoiser, decode_latents, load_vae


def test_missing_hub_id_is_one_clear_error():
    with pytest.raises(WeightsNotFoundError, match="no-such-org/no-such-model.*--local-dir"):
        SDDenoiser("no-such-org/no-such-model")


def test_prompt_files(tmp_path):
    (tmp_path / "p.csv").write_text('id,caption\n1,"a cat, sitting"\n2,a dog\n')
    (tmp_path / "bad.csv").write_text("id,words\n1,a cat\n")
    assert read_prompts(tmp_path / "p.csv") == ["a cat, sitting", "a dog"]
    with pytest.raises(ValueError, match="no prompt column"):
        read_prompts(tmp_path / "bad.csv")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="blank.txt holds no prompts"):  # not a division by zero at the first batch
        read_prompts(tmp_path / "blank.txt")
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pyarrow"):
            read_prompts(tmp_path / "p.parquet")


def test_prompt_embeddings_are_the_pipelines_and_cached(sd, monkeypatch):
    from transformers import CLIPTextModel, CLIPTokenizer

    cache = PromptEmbeddings(sd["pipe"], sd["cache"])
    emb = cache.load(PROMPTS[:3])
    tok = CLIPTokenizer.from_pretrained(sd["pipe"], subfolder="tokenizer")
    ids = tok(PROMPTS[:3], padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt").input_ids
    expected = CLIPTextModel.from_pretrained(sd["pipe"], subfolder="text_encoder")(ids)[0]
    assert emb.dtype == torch.float16 and emb.shape == (3, MAX_LEN, 16)
    torch.testing.assert_close(emb.float(), expected, atol=2e-3, rtol=2e-3)
    monkeypatch.setattr("dmd_lightning.sd.model.load_text_encoder", lambda path: pytest.fail("text encoder ran again"))
    assert torch.equal(cache.load(PROMPTS[:3]), emb)
    assert cache.path(PROMPTS[:2]) != cache.path(PROMPTS[:3])


def test_a_text_encoder_replaced_in_place_is_not_read_from_the_old_embeddings(tmp_path):
    (tmp_path / "pipe" / "text_encoder").mkdir(parents=True)
    weights = tmp_path / "pipe" / "text_encoder" / "model.safetensors"
    weights.write_bytes(b"old")
    cache = PromptEmbeddings(str(tmp_path / "pipe"), str(tmp_path / "cache"))
    before = cache.path(PROMPTS[:2])
    (tmp_path / "pipe" / "unet").mkdir()
    (tmp_path / "pipe" / "unet" / "model.safetensors").write_bytes(b"another unet")  # not the text encoder's
    assert cache.path(PROMPTS[:2]) == before
    weights.write_bytes(b"new weights")
    assert cache.path(PROMPTS[:2]) != before


def test_sd_denoiser_guides_with_the_empty_prompt(sd, teacher):
    assert teacher.text_conditional and teacher.schedule.beta_schedule == "scaled_linear"
    torch.testing.assert_close(teacher.null_embedding, embed(sd, [""]), atol=2e-3, rtol=2e-3)
    cond = embed(sd, PROMPTS[:2])
    assert torch.equal(teacher.null_cond(cond)[1], teacher.null_embedding[0].to(cond.dtype))
    assert teacher(torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), cond).shape == (2, 4, 8, 8)
    checkpointed = SDDenoiser(sd["pipe"], gradient_checkpointing=True, embedding_cache=sd["cache"])
    assert checkpointed.unet.is_gradient_checkpointing


def test_latent_pairs_are_the_teachers_samples_with_recoverable_prompts(sd, teacher, pairs):
    data = LatentPairDataset(pairs, expect={"sampler": "pndm", "num_steps": 3, "guidance_scale": 3.0})
    assert data.x.dtype == torch.float16 and data.x.shape == (5, 4, 8, 8) and data.cond is None
    assert data.prompts == PROMPTS and data.manifest["num_prompts"] == 6
    assert len(set(data.prompt_index.tolist())) == 5  # a permutation: distinct prompts for the first N pairs
    cond = embed(sd, [PROMPTS[i] for i in data.prompt_index.tolist()])
    sched = make_scheduler("pndm", teacher.schedule.config)
    noise = torch.stack([item_noise(1, i, [4, 8, 8]) for i in range(5)])  # float32, as the teacher got it
    torch.testing.assert_close(data.noise[:], noise.half())
    expected = sample_ode(teacher, noise, sched, 3, cond, guidance_scale=3.0)
    torch.testing.assert_close(data.x[:].float(), expected, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("decoder", ["kl", "tiny"])
def test_decoded_lpips_reaches_the_latents(sd, decoder):
    lpips = LPIPSLoss(resize=224 if decoder == "kl" else None, random_backbone=True)  # the paper's 224 once
    loss = DecodedLPIPSLoss(sd["pipe"] if decoder == "kl" else sd["taesd"], lpips, decoder)
    assert not any(p.requires_grad for p in loss.parameters()) and loss.vae.encoder is None
    pred, target = torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 4, 8, 8)
    value = loss(pred, target)
    value.backward()
    assert value > 0 and pred.grad.abs().sum() > 0
    assert decode_latents(loss.vae, target).shape == (2, 3, 64, 64)


def test_dmd_fit_steps_with_decoded_lpips(sd, teacher, pairs, tmp_path):
    regression = DecodedLPIPSLoss(sd["pipe"], LPIPSLoss(resize=None, random_backbone=True))
    module = DMDModule(teacher, regression_loss=regression,
                       dm_loss=DMLoss(guidance_scale=3.0), optim=toy_optim(warmup_steps=1))
    dm = SDDMDDataModule(str(pairs), sd["prompts"], sd["pipe"], embedding_cache=sd["cache"], batch_size=2,
                         pair_batch_size=2, expect={"teacher": sd["pipe"], "guidance_scale": 3.0})
    g0 = [p.detach().clone() for p in module.generator.parameters()]
    trainer = quiet_trainer(tmp_path, max_steps=4)
    trainer.fit(module, datamodule=dm)
    assert module.iteration == 2 and torch.isfinite(trainer.callback_metrics["generator/loss_regression"])
    assert any(not torch.equal(a, b) for a, b in zip(g0, module.generator.parameters()))
    batch = dm.train_batch(torch.Generator().manual_seed(0), 1)
    assert batch["cond"].shape == (2, MAX_LEN, 16) and batch["pair_cond"].shape == (2, MAX_LEN, 16)
    assert torch.equal(batch["z"], dm.train_batch(torch.Generator().manual_seed(0), 1)["z"])  # resumable
    assert dm.state_dict()["position"] == 2  # batches that reached training_step, not the prefetched one


def test_validate_decodes_resizes_and_calls_fidelity_with_local_inception(sd, teacher, pairs, tmp_path, monkeypatch):
    import torch_fidelity
    from PIL import Image

    from dmd_lightning.images import to_uint8
    from dmd_lightning.sd.eval import TextToImageEvaluator

    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(3):
        Image.fromarray((torch.rand(300, 400, 3) * 255).byte().numpy()).save(refs / f"{i}.png")
    (tmp_path / "inception.pth").write_bytes(b"stand-in")
    calls = []
    monkeypatch.setattr(torch_fidelity, "calculate_metrics",
                        lambda **kw: calls.append(kw) or {torch_fidelity.KEY_METRIC_FID: 12.5})
    evaluator = TextToImageEvaluator(sd["pipe"], str(refs), str(tmp_path / "inception.pth"), clip=sd["clip"],
                                     cache_dir=str(tmp_path / "fid"))
    module = DMDModule(teacher, evaluator=evaluator)
    dm = SDDMDDataModule(str(pairs), sd["prompts"], sd["pipe"], embedding_cache=sd["cache"], val_size=3,
                         val_batch_size=2)
    trainer = DMDTrainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(module, datamodule=dm)[0]
    assert metrics["val/fid"] == 12.5 and 0 <= metrics["val/clip_score"] <= 100
    kw = calls[0]
    assert kw["feature_extractor"] == "inception-v3-compat"
    assert kw["feature_extractor_weights_path"].endswith("inception.pth")
    assert len(kw["input1"]) == 3 and kw["input1"][0].shape == (3, 256, 256) and kw["input2"][0].shape == (3, 256, 256)
    batch = dm.val_dataloader().dataset[0]
    assert batch["prompt"] == PROMPTS[:2]
    x = module.sample(batch["z"], batch["cond"])
    decoded = to_uint8(decode_latents(evaluator.vae, x))[0].permute(1, 2, 0).numpy()
    expected = torch.from_numpy(np.asarray(Image.fromarray(decoded).resize((256, 256), Image.LANCZOS)))
    assert torch.equal(evaluator.samples[0][0].permute(1, 2, 0), expected)
    name = evaluator.metric_kwargs()["reference_name"]  # the reference's features are cached under this name
    Image.fromarray((torch.rand(200, 200, 3) * 255).byte().numpy()).save(refs / "1.png")  # replaced in place
    assert evaluator.metric_kwargs()["reference_name"] != name


def exported(module, tmp_path):
    """`dmd export` of the module, with an EMA generator that differs from the teacher, loaded by diffusers."""
    from diffusers import StableDiffusionPipeline

    with torch.no_grad():
        for p in module.generator_ema.parameters():
            p.add_(0.01 * torch.randn_like(p))
    DMDTrainer(logger=False).export(module, out_dir=str(tmp_path / "export"))
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "export"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_export_is_a_one_step_diffusers_pipeline(sd, teacher, tmp_path):

    module = DMDModule(teacher)
    pipe = exported(module, tmp_path)
    z = torch.randn(2, 4, 8, 8)
    out = pipe(PROMPTS[:2], num_inference_steps=1, guidance_scale=1.0, latents=z, output_type="pt").images
    assert pipe.scheduler.timesteps.tolist() == [999]
    with torch.no_grad():
        x = module.sample(z, embed(sd, PROMPTS[:2]))
        expected = (decode_latents(load_vae(sd["pipe"]), x) / 2 + 0.5).clamp(0, 1)
    assert out.shape == (2, 3, 64, 64)
    torch.testing.assert_close(out, expected, atol=5e-3, rtol=0)


def test_sd15_config_fits_with_the_tiny_pipeline(sd, pairs, tmp_path):
    """configs/sd15.yaml as is, but for paths and sizes: the tiny pipeline stands in for the hub id."""
    lpips = {"backbone_weights": None, "random_backbone": True, "resize": 64}
    model = {"teacher": {"init_args": {"path": sd["pipe"], "embedding_cache": sd["cache"]}},
             "regression_loss": {"init_args": {"vae": sd["taesd"], "lpips": {"init_args": lpips}}}, "evaluator": None}
    data = {"pairs_dir": str(pairs), "prompts": sd["prompts"], "text_encoder": sd["pipe"],
            "embedding_cache": sd["cache"], "batch_size": 1, "pair_batch_size": 1, "val_prompts": None,
            "expect": {"teacher": sd["pipe"], "sampler": "pndm"}}
    run, args = cli_on_tiny("configs/sd15.yaml", tmp_path, 2, model, data)
    m = run.model
    assert m.dm_loss.guidance_scale == 3.0 and m.optim.generator_lr == m.optim.fake_lr == 1e-5
    assert m.hparams.regression_weight == 0.25 and list(m.dm_loss.t_range) == [0.02, 0.98]
    assert m.optim.weight_decay == 0.01 and m.optim.warmup_steps == 500 and m.optim.gradient_clip == 10.0
    assert m.teacher.unet.is_gradient_checkpointing and m.iteration == 1
    assert isinstance(m.regression_loss, DecodedLPIPSLoss)
    assert not any(p.requires_grad for p in m.regression_loss.parameters())

    run.trainer.save_checkpoint(tmp_path / "last.ckpt")  # `dmd export` from that checkpoint
    cli(["export", *args, "--ckpt_path", str(tmp_path / "last.ckpt"), "--out_dir", str(tmp_path / "export")])
    from diffusers import UNet2DConditionModel

    exported = UNet2DConditionModel.from_pretrained(tmp_path / "export" / "unet").state_dict()
    for k, v in m.generator_ema.denoiser.unet.state_dict().items():
        assert torch.equal(exported[k], v), k

    # `dmd predict` with the config's SampleWriter: decoded images and their prompts
    writer = {"class_path": "dmd_lightning.predict.SampleWriter",
              "init_args": {"out": str(tmp_path / "samples.npz"), "vae": sd["pipe"]}}
    import yaml

    (tmp_path / "predict.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": [writer]},
                                                           "data": {"init_args": {"val_size": 3}}}))
    cli(["predict", *args, "--config", str(tmp_path / "predict.yaml"), "--ckpt_path", str(tmp_path / "last.ckpt")])
    samples = np.load(tmp_path / "samples.npz")
    assert samples["images"].shape == (3, 64, 64, 3) and samples["images"].dtype == np.uint8
    assert samples["prompts"].tolist() == PROMPTS[:3]


@pytest.mark.parametrize("suffix", [".npz", ""])
def test_sample_writer_decodes_latents_and_keeps_the_prompts(sd, tmp_path, suffix):
    from types import SimpleNamespace

    from dmd_lightning.images import to_uint8
    from dmd_lightning.predict import SampleWriter

    out = tmp_path / f"samples{suffix}"
    writer = SampleWriter(str(out), vae=sd["pipe"])
    trainer = SimpleNamespace(world_size=1, global_rank=0)
    latents = torch.randn(2, 4, 8, 8)
    prediction = {"x": latents, "cond": torch.randn(2, 7, 16), "prompt": PROMPTS[:2]}  # embeddings are no labels
    writer.write_on_batch_end(trainer, None, prediction, None, None, 0)
    writer.on_predict_epoch_end(trainer, None)
    expected = to_uint8(decode_latents(load_vae(sd["pipe"]), latents)).permute(0, 2, 3, 1).numpy()
    if suffix:
        saved = np.load(out)
        assert set(saved.files) == {"images", "prompts"} and saved["images"].shape == (2, 64, 64, 3)
        assert np.array_equal(saved["images"], expected) and saved["prompts"].tolist() == PROMPTS[:2]
    else:
        from PIL import Image

        assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000000.txt", "000001.png", "000001.txt"]
        assert np.array_equal(np.asarray(Image.open(out / "000001.png")), expected[1])
        assert (out / "000000.txt").read_text() == PROMPTS[0] + "\n"


def test_sd15_dmd2_config_fits_without_pairs(sd, tmp_path):
    """configs/sd15_dmd2.yaml as is, but for paths and sizes: no pairs are read, the GAN sees real latents of a
    tiny image folder encoded by the tiny pipeline's VAE; prompts and captions encoded on the device."""

    write_real_images(tmp_path / "real", 3)
    real = {"source": str(tmp_path / "real"), "vae": sd["pipe"], "resolution": 64, "cache_dir": str(tmp_path / "rc")}
    model = {"teacher": {"init_args": {"path": sd["pipe"], "embedding_cache": sd["cache"]}}, "evaluator": None}
    data = {"prompts": sd["prompts"], "text_encoder": sd["pipe"], "embedding_cache": sd["cache"], "batch_size": 1,
            "val_prompts": None, "latent_shape": [4, 8, 8], "real_images": {"init_args": real}, "embed": "device"}
    run, _ = cli_on_tiny("configs/sd15_dmd2.yaml", tmp_path, 3, model, data, log_every_n_steps=1)
    m = run.model
    assert m.dm_loss.guidance_scale == 1.75 and m.optim.generator_lr == m.optim.fake_lr == 1e-5
    assert m.hparams.fake_updates_per_generator_update == 10 and m.regression_loss is None
    assert run.datamodule.pairs is None and m.iteration == 2  # 3 optimizer steps: generator + fake, then fake
    assert m.gan.generator_weight == 1e-3 and m.gan.classifier_weight == 1e-2
    assert list(m.fake_loss.t_range) == [0.0, 1.0] and m.classifier is not None
    assert run.datamodule.real.images.shape == (3, 4, 8, 8) and run.datamodule.text_encoder is not None
    assert torch.isfinite(run.trainer.callback_metrics["fake_score/loss_classifier"])


def test_a_multi_step_export_samples_as_the_generator(sd, teacher, tmp_path):

    from dmd_lightning.generator import MultiStepGenerator

    module = DMDModule(teacher, MultiStepGenerator.from_teacher(teacher, (999, 499)), regression_loss=None)
    pipe = exported(module, tmp_path)
    z = torch.randn(2, 4, 8, 8)
    out = pipe(PROMPTS[:2], timesteps=[999, 499], guidance_scale=1.0, latents=z, output_type="pt",
               generator=torch.Generator().manual_seed(7)).images
    assert pipe.scheduler.timesteps.tolist() == [999, 499]
    with torch.no_grad():  # the same fresh noise between the steps: both draw it from the generator, in order
        x = module.generator_ema(z, embed(sd, PROMPTS[:2]), torch.Generator().manual_seed(7))
        expected = (decode_latents(load_vae(sd["pipe"]), x) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(out, expected, atol=5e-3, rtol=0)
    assert "timesteps=[999, 499]" in (tmp_path / "export" / "README.md").read_text()
