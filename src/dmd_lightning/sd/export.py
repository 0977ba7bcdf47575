"""`dmd export` of a Stable Diffusion student: its (EMA) generator as a diffusers StableDiffusionPipeline folder.

The folder holds the generator's UNet with the teacher's vae/, text_encoder/ and tokenizer/, and a DDIMScheduler
set up so that one inference step is exactly the generator: timestep_spacing='trailing' makes the single step
t = T - 1 (as G reads pure noise as x_{T-1}), and set_alpha_to_one makes DDIM's update from there return its
x_0 prediction. Use it as

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    image = pipe(prompt, num_inference_steps=1, guidance_scale=1.0).images[0]

A LoRA generator (dmd_lightning.lora) is written with its adapters merged into the UNet, and its adapters alone
as diffusers' LoRA file in lora/: the teacher's pipeline with `pipe.load_lora_weights(folder + "/lora")` and the
folder's scheduler samples as the merged pipeline does.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from dmd_lightning.errors import ConfigError
from dmd_lightning.export import DTYPES, generator_unet, step_scheduler, unet_copy
from dmd_lightning.loading import load_pretrained
from dmd_lightning.lora import is_lora


def one_step_scheduler(teacher_scheduler_config: dict):
    """A DDIMScheduler on the teacher's schedule whose single step maps pure noise at t = T-1 to x_0."""
    from diffusers import DDIMScheduler

    config = {k: v for k, v in dict(teacher_scheduler_config).items() if not k.startswith("_")}
    return DDIMScheduler.from_config({**config, "timestep_spacing": "trailing", "set_alpha_to_one": True,
                                      "clip_sample": False, "thresholding": False, "steps_offset": 0})


def export_pipeline(generator: nn.Module, teacher_path: str, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write a StableDiffusionPipeline folder: the generator's UNet, the teacher's VAE, text encoder and tokenizer
    (loaded from `teacher_path`, a pipeline folder or hub id) and the one-step scheduler, or for a multi-step
    generator an LCMScheduler called with its timesteps (export.step_scheduler). No safety checker."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = unet_copy(generator, dtype)  # a LoRA generator's adapters merged in
    lora = is_lora(generator_unet(generator))
    steps = list(generator.timesteps)
    if len(steps) == 1 and steps[0] != generator.denoiser.schedule.T - 1:
        raise ConfigError(f"the generator reads noise at t={steps[0]}; a DDIM step can only start at T-1")
    scheduler_config = DDPMScheduler.load_config(teacher_path, subfolder="scheduler")
    scheduler = one_step_scheduler(scheduler_config) if len(steps) == 1 else step_scheduler(scheduler_config, steps)
    pipe = StableDiffusionPipeline(
        vae=load_pretrained(AutoencoderKL, teacher_path, "vae", torch_dtype=DTYPES[dtype]),
        text_encoder=load_pretrained(CLIPTextModel, teacher_path, "text_encoder", torch_dtype=DTYPES[dtype]),
        tokenizer=load_pretrained(CLIPTokenizer, teacher_path, "tokenizer"),
        unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    out = Path(out_dir)
    pipe.save_pretrained(str(out))
    if lora:
        export_lora(generator_unet(generator), out / "lora", dtype)
    call = ("num_inference_steps=1" if len(steps) == 1 else f"timesteps={steps}")
    (out / "README.md").write_text(
        f"# {len(steps)}-step generator distilled with DMD (dmd-lightning)\n\n"
        "```python\nfrom diffusers import StableDiffusionPipeline\n"
        f"pipe = StableDiffusionPipeline.from_pretrained({str(out)!r})\n"
        f"image = pipe(prompt, {call}, guidance_scale=1.0).images[0]\n```\n\n"
        + ("One step: the scheduler's single trailing DDIM step returns the generator's x0 from noise at t = T-1. "
           if len(steps) == 1 else f"Exactly these timesteps: x0 at each, noised afresh to the next ({steps}). ")
        + "No classifier-free guidance (guidance_scale=1.0): the guidance was distilled into the UNet.\n"
        + ("\nThe UNet holds the LoRA generator's adapters merged in; lora/ holds them alone, for the teacher's "
           "pipeline with this folder's scheduler: `pipe.load_lora_weights(folder + '/lora')`.\n" if lora else ""))
    return out


def export_lora(unet: nn.Module, out_dir: str | Path, dtype: str = "float32") -> Path:
    """A LoRA UNet's adapters as diffusers' LoRA file (out_dir/pytorch_lora_weights.safetensors), their rank,
    alpha and targets in its metadata, for `StableDiffusionPipeline.load_lora_weights(out_dir)`."""
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    # peft's key names (`...to_q.lora_A.weight`), as diffusers' own save_lora_adapter writes them: its older
    # convert_state_dict_to_diffusers names (`to_q.lora.down`) are not read back with the rank/alpha metadata
    state = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(str(out_dir), unet_lora_layers=state,
                                              unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    return Path(out_dir)
