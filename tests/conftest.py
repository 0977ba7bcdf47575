import json
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: it reads the variable once

import pytest
import torch
from lightning import Callback, Trainer, seed_everything

from dmd_lightning.cli import DMDTrainer
from dmd_lightning.data.stream import DMDDataModule, RealImages
from dmd_lightning.sd.data import LatentPairGenerationDataModule, TextPairGenerator
from dmd_lightning.sd.model import PromptEmbeddings, SDDenoiser

warnings.filterwarnings("ignore")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_unet(num_classes: int | None = 10, channels: int = 1, size: int = 16, prediction_type: str = "epsilon"):
    """A tiny class-conditional UNet2DModel and its schedule, random weights."""
    from diffusers import UNet2DModel

    from dmd_lightning import VPSchedule

    unet = UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=4, attention_head_dim=8,
        num_class_embeds=num_classes + 1 if num_classes else None,
    )
    return unet, VPSchedule(prediction_type=prediction_type)


def assert_same_weights(expected, got, rtol: float = 0.0, atol: float = 0.0):
    """Two modules hold the same state dict, key by key (bit for bit by default)."""
    a, b = expected.state_dict(), got.state_dict()
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=rtol, atol=atol, msg=k)


def assert_same_tree(a, b, where="obj"):
    """Equal values of equal types, tensors bit for bit with their dtype and shape."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_gradients(expected: list[dict], got: list[dict], rtol: float = 1e-4, atol: float = 1e-6):
    """Per optimizer step, the same parameters received the same gradients."""
    for step, (a, b) in enumerate(zip(expected, got)):
        assert sorted(a) == sorted(b) and a, step
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=rtol, atol=atol, msg=f"{name} at step {step}")


def quiet_trainer(tmp_path, max_steps: int, **kw) -> DMDTrainer:
    """`dmd`'s Trainer on the CPU for a few steps: no logger, checkpoints, progress bar or validation; metrics logged
    at every step."""
    return DMDTrainer(accelerator="cpu", max_steps=max_steps, logger=False, log_every_n_steps=1,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      limit_val_batches=0, default_root_dir=tmp_path, **kw)


def cli_on_tiny(config: str, tmp_path, max_steps: int, model: dict, data: dict, command: str = "fit", **trainer):
    """`dmd <command> --config <config>` with a second config over it: the CPU, `max_steps`, no logger, callbacks,
    checkpoints or validation, and `model` / `data` init_args (the tiny stand-ins' paths and sizes). Returns the
    LightningCLI run and its arguments (for a later export or predict with the same configs)."""
    import yaml

    from dmd_lightning.cli import cli

    override = {"trainer": {"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32-true",
                            "max_steps": max_steps, "limit_val_batches": 0, "logger": False, "callbacks": None,
                            "enable_checkpointing": False, "default_root_dir": str(tmp_path),
                            "enable_progress_bar": False, **trainer},
                "model": {"init_args": model}, "data": {"init_args": data}}
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
    args = ["--config", config, "--config", str(tmp_path / "override.yaml")]
    return cli([command, *args]), args


def gloo_ranks():
    """DDP over spawned gloo processes whose collectives time out after 2 minutes: a rank left waiting for another
    fails the test instead of hanging it."""
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=120))


def toy_module(optim: dict | None = None, **kw):
    """DMDModule on the 2-D toy with small MLPs: a training step in milliseconds. optim: Optimization's
    arguments over the toy's (lr 1e-3, 2 warm-up steps)."""
    from dmd_lightning import DMDModule, L2Loss, VPSchedule
    from dmd_lightning.toy2d.mixture import GaussianMixtureDenoiser, MLPDenoiser, MLPGenerator

    schedule = VPSchedule()
    return DMDModule(GaussianMixtureDenoiser(schedule), MLPGenerator(hidden=32), MLPDenoiser(schedule, hidden=32),
                     regression_loss=L2Loss(), optim=toy_optim(**(optim or {})), **kw)


def toy_optim(**kw):
    """Optimization for tests: lr 1e-3, 2 warm-up steps, unless given."""
    from dmd_lightning.optim import Optimization

    return Optimization(**{"generator_lr": 1e-3, "fake_lr": 1e-3, "warmup_steps": 2, **kw})


def fit(module, max_steps, tmp_path, ckpt_path=None, **kw):
    """Trains `module` on the toy data, quietly, on the CPU; the Trainer."""
    from lightning import Trainer

    from dmd_lightning.toy2d.mixture import ToyDataModule

    trainer = Trainer(**{"max_steps": max_steps, "logger": False, "enable_progress_bar": False,
                         "enable_model_summary": False, "default_root_dir": tmp_path, "limit_val_batches": 0,
                         "accelerator": "cpu", **kw})
    trainer.fit(module, datamodule=ToyDataModule(batch_size=32, pair_batch_size=16, num_pairs=64, sampler_steps=10),
                ckpt_path=ckpt_path)
    return trainer


class RandomImages(RealImages):
    """64 random 1x16x16 images with labels 0..9, as real images for the GAN."""

    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(5)
        self.images, self.labels = torch.rand(n, 1, 16, 16, generator=g) * 2 - 1, torch.arange(n) % 10


def teacher_v():
    """A tiny v-prediction UNet teacher on a zero-terminal-SNR schedule, as teacher v2 is."""
    from dmd_lightning import UNetDenoiser, VPSchedule

    torch.manual_seed(0)
    unet, _ = tiny_unet(prediction_type="v_prediction")
    return UNetDenoiser(unet, VPSchedule(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                         timestep_spacing="trailing"))


def dmd2(steps=(999,), **kw):
    """DMD2 on the tiny teacher: GAN weights of the paper, no regression, two fake updates per generator update."""
    from dmd_lightning import DMDModule
    from dmd_lightning.gan import GANLoss
    from dmd_lightning.generator import MultiStepGenerator

    t = teacher_v()
    generator = MultiStepGenerator.from_teacher(t, steps) if len(steps) > 1 else None
    args = dict(regression_loss=None, gan=GANLoss(generator_weight=3e-3, classifier_weight=1e-2),
                optim=toy_optim(warmup_steps=0), fake_updates_per_generator_update=2)
    return DMDModule(t, generator, **{**args, **kw})


# ---- DMD2 on images: fit, and two gloo ranks against one process
def fit_images(module, tmp_path, max_steps, ckpt_path=None, callbacks=(), **kw):
    trainer = Trainer(**{"max_steps": max_steps, "logger": False, "enable_progress_bar": False,
                         "enable_model_summary": False, "default_root_dir": tmp_path, "limit_val_batches": 0,
                         "accelerator": "cpu", "callbacks": list(callbacks), **kw})
    data = DMDDataModule(None, batch_size=4, real_images=RandomImages(), val_size=8, val_batch_size=8)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


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
    quiet_trainer(tmp_path, steps, devices=devices, strategy=strategy, callbacks=[SaveGradients(tmp_path)]).fit(
        module, datamodule=data)


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


# ---- the tiny Stable Diffusion pipeline, saved in diffusers' layout
PROMPTS = ["a cat", "a red dog", "the sea at night", "two birds", "a tree", "blue sky"]
MAX_LEN = 16


def write_tokenizer(folder):
    """A CLIPTokenizer over single letters (with and without the end-of-word mark)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab.update({c: len(vocab) + i for i, c in enumerate(letters)})
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(letters)})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_LEN)
    return tok, len(vocab)


def write_real_images(folder, n: int = 5, size: int = 64):
    """n random RGB images `i.png` of size x size, each with its caption `i.txt`; their captions."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(3)
    captions = [f"real photo {chr(ord('a') + i)}" for i in range(n)]
    for i, caption in enumerate(captions):
        pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption + "\n")
    return captions


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny SD1.5-layout pipeline folder (unet, vae, text_encoder, tokenizer, scheduler), a TAESD folder and a
    CLIP folder, all random."""
    from diffusers import AutoencoderKL, AutoencoderTiny, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    tok, vocab_size = write_tokenizer(root / "vocab")
    tok.save_pretrained(root / "pipe" / "tokenizer")
    text = dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=MAX_LEN, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPTextModel(CLIPTextConfig(**text)).save_pretrained(root / "pipe" / "text_encoder")
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    ).save_pretrained(root / "pipe" / "unet")
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(4, 4, 4, 4), latent_channels=4, layers_per_block=1, norm_num_groups=2,
                  sample_size=64, scaling_factor=0.18215).save_pretrained(root / "pipe" / "vae")
    PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True,
                  steps_offset=1, set_alpha_to_one=False).save_pretrained(root / "pipe" / "scheduler")
    AutoencoderTiny(encoder_block_out_channels=(4,) * 4, decoder_block_out_channels=(4,) * 4,
                    num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4).save_pretrained(root / "taesd")
    vision = dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    return {"root": root, "pipe": str(root / "pipe"), "taesd": str(root / "taesd"), "clip": str(root / "clip"),
            "prompts": str(root / "prompts.txt"), "cache": str(root / "cache")}


@pytest.fixture(scope="module")
def teacher(sd):
    return SDDenoiser(sd["pipe"], embedding_cache=sd["cache"])


@pytest.fixture(scope="module")
def pairs(sd, teacher):
    out = sd["root"] / "pairs"
    dm = LatentPairGenerationDataModule(str(out), sd["prompts"], sd["pipe"], num_pairs=5, shard_size=3,
                                        resolution=64, batch_size=2, seed=1, embedding_cache=sd["cache"])
    trainer = DMDTrainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.pairs(TextPairGenerator(teacher, num_steps=3), dm)
    return out


def embed(sd, prompts):
    return PromptEmbeddings(sd["pipe"], sd["cache"]).load(prompts).float()
