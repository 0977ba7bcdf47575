"""The models and timing tools of `make bench`: the cases it measures (the Fashion-MNIST teacher, random UNets of
SD1.5's layout, a tiny UNet2DModel) and medians of wall time and network-evaluation counts."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from dmd_lightning.denoisers import Denoiser, PretrainedUNetDenoiser, UNetDenoiser
from dmd_lightning.optim import make_adamw
from dmd_lightning.perf import median, median_time
from dmd_lightning.schedule import VPSchedule

SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
)
TINY_SD_UNET = dict(SD15_UNET, sample_size=8, block_out_channels=(32, 32, 64, 64), cross_attention_dim=32,
                    attention_head_dim=4, norm_num_groups=8)
SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@dataclass
class Case:
    """A teacher and the settings of its pairs config: the batch, the sampler and the guidance."""

    name: str
    teacher: Denoiser
    make_cond: Callable[[int], Tensor | None]
    batch: int
    sampler: str = "ddim"
    steps: int = 50
    guidance: float = 1.0

    @property
    def shape(self) -> tuple[int, ...]:
        c = self.teacher.unet.config
        return (c["in_channels"], c["sample_size"], c["sample_size"])

    def noise(self, n: int, seed: int = 0) -> Tensor:
        # drawn on the CPU as diffusers' randn_tensor does with a CPU generator, then moved
        return torch.randn((n, *self.shape), generator=torch.Generator().manual_seed(seed)).to(device())


def silence() -> None:
    """Every warning and Lightning's banners off: they would bury the table (dmd's own `quiet` drops only the
    project's known ones)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast():
    """bf16 autocast on a GPU (as the Trainer's bf16-mixed), nothing on the CPU: both sides of a ratio use it."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_available())


def make_case(name: str, quick: bool = False) -> Case:
    """fmnist: the shipped teacher; tiny-sd / sd15: a random UNet2DConditionModel of SD1.5's layout; tiny:
    a random unconditional UNet2DModel (its reference in row 3 is DDIMPipeline itself)."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    torch.manual_seed(0)
    dev = device()
    if name == "fmnist":
        teacher = PretrainedUNetDenoiser("weights/fmnist-teacher").to(dev)
        return Case(name, teacher, lambda n: torch.arange(n, device=dev) % 10, batch=4 if quick else 16)
    if name == "tiny":
        unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4)
        return Case(name, UNetDenoiser(unet, VPSchedule()).to(dev), lambda n: None, batch=2 if quick else 8)
    if name in ("tiny-sd", "sd15"):
        with torch.device(dev):  # random init on the GPU: seconds, not minutes
            unet = UNet2DConditionModel(**(TINY_SD_UNET if name == "tiny-sd" else SD15_UNET))
        dim = unet.config.cross_attention_dim
        teacher = UNetDenoiser(unet, VPSchedule(**SD_SCHEDULE), null_embedding=torch.zeros(1, 77, dim)).to(dev)
        batch = (2 if quick else 4) if name == "tiny-sd" else 4
        return Case(name, teacher, lambda n: torch.randn(n, 77, dim, device=dev), batch, "pndm", 50, 3.0)
    raise ValueError(f"unknown case {name!r}")


def interleaved_medians(fns: list[Callable[[], object]], repeat: int, warmup: int = 1) -> list[float]:
    """Median wall time of each fn, the fns run in turn (a, b, a, b, ...) so that a ratio of two of them is
    measured under the same machine load: drift on a shared machine hits both sides alike."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + repeat):
        for fn, ts in zip(fns, times):
            t = median_time(fn, 1, 0)
            if i >= warmup:
                ts.append(t)
    return [median(ts) for ts in times]


def count_nfe(unet: torch.nn.Module, batch: int, fn: Callable[[], object]) -> float:
    """Network evaluations per sample of fn(): rows passed through `unet`, divided by the batch."""
    rows = []
    handle = unet.register_forward_pre_hook(lambda m, args, kwargs: rows.append(len(args[0] if args else kwargs["sample"])),
                                            with_kwargs=True)
    try:
        fn()
    finally:
        handle.remove()
    return sum(rows) / batch


def training_state_bytes(unet_class: type, config: dict, lora_rank: int | None = None) -> dict[str, int]:
    """Bytes that training a generator on this UNet holds besides activations: its parameters (frozen ones too), their
    gradients and AdamW's state, counted tensor by tensor after one update run on the meta device (shapes and dtypes
    without memory or compute: exact and machine-independent, in seconds even for SD1.5). lora_rank: the UNet as
    LoRADenoiser adapts it (its targets, alpha 8), else full fine-tuning."""
    from dmd_lightning.lora import LoRADenoiser

    with torch.device("meta"):
        unet = unet_class.from_config(config)
    if lora_rank:
        LoRADenoiser(UNetDenoiser(unet, VPSchedule()), rank=lora_rank)  # adapters in place, the rest frozen
    c, meta = unet.config, torch.device("meta")
    kw = {"encoder_hidden_states": torch.zeros(1, 77, c["cross_attention_dim"], device=meta)} \
        if "cross_attention_dim" in c else {"class_labels": torch.zeros(1, dtype=torch.long, device=meta)} \
        if c.get("num_class_embeds") else {}
    opt = make_adamw(unet.parameters(), 1e-5, (0.9, 0.999), 0.01)
    x = torch.zeros(1, c["in_channels"], c["sample_size"], c["sample_size"], device=meta)
    unet(x, torch.full((1,), 999, device=meta), **kw).sample.float().square().mean().backward()
    opt.step()
    size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    params = list(unet.parameters())
    return {"parameters": size(params), "gradients": size(p.grad for p in params if p.grad is not None),
            "optimizer": size(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v))}
