"""A pixel-space (UNet2DModel) generator as a diffusers folder that runs without dmd-lightning:

    pipe = DiffusionPipeline.from_pretrained(folder)   # a ConsistencyModelPipeline with an LCMScheduler
    images = pipe(batch_size=4, class_labels=[0, 1, 2, 3], num_inference_steps=None, timesteps=[999, 749, 499, 249],
                  generator=torch.Generator().manual_seed(0)).images

Both are stock diffusers classes. ConsistencyModelPipeline is diffusers' class-conditional UNet2DModel pipeline;
its loop (scale_model_input, UNet(x, t, class_labels), scheduler.step(..., generator)) with export.step_scheduler
is exactly OneStepGenerator / MultiStepGenerator: x_0 at each timestep, noised afresh to the next one, the fresh
noise drawn from the call's `generator` after the initial noise, as MultiStepGenerator.simulate draws it.
`generator.json` records the timesteps for `dmd predict` (pretrained.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from dmd_lightning.checks import size_pair
from dmd_lightning.export import step_scheduler, unet_copy

INFO = "generator.json"


def lcm_timesteps(scheduler, num_steps: int) -> list[int]:
    """The timesteps the scheduler takes for `num_inference_steps=num_steps`."""
    scheduler.set_timesteps(num_steps)
    return [int(t) for t in scheduler.timesteps]


def export_pixel_pipeline(generator: nn.Module, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write the generator's UNet and an LCMScheduler taking its timesteps as a ConsistencyModelPipeline folder, with
    generator.json (timesteps, null label, sample shape) and a README giving the call that reproduces it."""
    from diffusers import ConsistencyModelPipeline

    steps = [int(t) for t in generator.timesteps]
    unet = unet_copy(generator, dtype)
    scheduler = step_scheduler(generator.denoiser.schedule.config, tuple(steps))
    pipe = ConsistencyModelPipeline(unet=unet, scheduler=scheduler)
    out = Path(out_dir)
    pipe.save_pretrained(str(out))
    null_label = getattr(generator.denoiser, "null_label", None)
    shape = [unet.config.in_channels, *size_pair(unet.config.sample_size)]
    (out / INFO).write_text(json.dumps({"timesteps": steps, "null_label": null_label, "sample_shape": shape}) + "\n")
    exact = lcm_timesteps(scheduler, len(steps)) == steps  # then num_inference_steps alone gives them
    step_args = f"num_inference_steps={len(steps)}" if exact else f"num_inference_steps=None, timesteps={steps}"
    labels = (f"class_labels=[0, 1, 2, 3],  # labels 0..{null_label - 1}; {null_label} is the null label\n    "
              if null_label is not None else "")
    (out / "README.md").write_text(
        f"# {len(steps)}-step generator distilled with DMD (dmd-lightning)\n\n"
        "```python\nimport torch\nfrom diffusers import DiffusionPipeline\n\n"
        f"pipe = DiffusionPipeline.from_pretrained({str(out)!r})\n"
        f"images = pipe(batch_size=4, {labels}{step_args},\n"
        "    generator=torch.Generator().manual_seed(0)).images  # PIL images; output_type='pt' gives [0, 1] tensors\n"
        "```\n\n"
        f"Exactly these timesteps: {steps}: the UNet's x0 at each, noised afresh to the next. Pass class labels: "
        "without them the pipeline draws random ones, the null label included. Stock diffusers classes "
        "(ConsistencyModelPipeline, LCMScheduler); no classifier-free guidance, the UNet is the generator.\n")
    return out
