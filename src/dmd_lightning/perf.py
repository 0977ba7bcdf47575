"""Speed as model FLOPs utilisation (MFU): the FLOPs a training iteration asks of the hardware, counted with
torch.utils.flop_counter, over the time it takes and the card's dense peak for the training dtype (`DENSE_PEAKS`
for bf16/fp16 on data-centre cards, else Lightning's `get_available_flops`; none for CPUs, where only rates are
logged).

`Throughput` is a callback: it counts the FLOPs of the first iterations of a fit (one generator iteration and the
fake-score-only ones of the two time-scale rule, averaged as the rule mixes them) and then, every
`log_every_n_steps`, logs `perf/iterations_per_s`, `perf/samples_per_s` (the DM batch over all devices) and
`perf/mfu`. It synchronises the device only on those logging steps; the counting iterations are not timed.

`Timer` is Lightning's `max_time` Timer whose ranks agree on the limit every `log_every_n_steps` batches, not at
every batch (under DDP the agreement is a broadcast, which waits for the device); `dmd` uses it for `max_time`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from lightning import Callback
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import Timer as LightningTimer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Dense (no structured sparsity) bf16 / fp16 tensor-core peaks, FLOP/s, from NVIDIA's data sheets, by a part of the
# name torch gives the card, most specific first. Lightning's table knows the H200 under other names ("H200 SXM1")
# and lists its with-sparsity figure, which would halve the MFU.
DENSE_PEAKS = (("h200 nvl", 835e12), ("h200", 989.4e12), ("h100 nvl", 835e12), ("h100 pcie", 756e12),
               ("h100", 989.4e12), ("a100", 312e12), ("l40s", 362e12), ("l40", 181e12), ("l4", 121e12))
PRECISION_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16,
                    "16-true": torch.float16, "32-true": torch.float32, "32": torch.float32}


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def median_time(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    """Median wall time of fn() over `repeat` runs after `warmup` runs (CUDA synchronized)."""
    times = []
    for i in range(warmup + repeat):
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return median(times)


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs


def compile_target(net: nn.Module) -> nn.Module:
    """What Compilation.apply compiles in `net`: its diffusers UNet (a denoiser's, or that of a generator's denoiser,
    whose training calls go through `step`, not `forward`), else the network itself."""
    for owner in (net, getattr(net, "denoiser", None)):
        if isinstance(getattr(owner, "unet", None), nn.Module):
            return owner.unet
    return net


@dataclass(frozen=True)
class Compilation:
    """torch.compile for the networks, not the LightningModule: each network's compile_target compiled in place
    (parameters and state-dict keys unchanged) with `backend` ("aot_eager" captures the graphs without generating
    code: tests) and `mode` ("reduce-overhead": CUDA graphs where shapes are static). Nothing flips requires_grad
    between DMD's phases. A CUDA graph's outputs live until the next replay of that graph: the denoisers' x0
    conversion (outside the compiled UNet) copies them, and each training step starts with `step_begin`.

    torch keeps one cache of graphs per function, here shared by every UNet of a class: teacher, fake score,
    generator and its EMA, called with and without gradient, in train and eval mode, at training and validation
    batch sizes: a short DMD2 4-step fit with validation made 7 graphs of the UNet's forward, next to torch's default
    limit of 8, past which it runs eager with only a warning; `recompile_limit` raises it."""

    backend: str = "inductor"
    mode: str | None = None
    recompile_limit: int = 32

    def apply(self, nets) -> None:
        import torch._dynamo.config

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, self.recompile_limit)
        for net in nets:
            compile_target(net).compile(backend=self.backend, mode=self.mode)

    def step_begin(self, device: torch.device) -> None:
        """Marks a new training step for CUDA graphs: the last step's graph outputs may now be overwritten."""
        if self.mode in CUDA_GRAPH_MODES and device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()


def sync_every(trainer) -> int:
    """Batches between the steps on which the host may wait for the device (logging, the ranks' agreements):
    Lightning's `log_every_n_steps`, or its default 50 where logging is off (0)."""
    return trainer.log_every_n_steps or 50


def count_flops(fn) -> int:
    """FLOPs of the operators `fn()` runs (forward and backward), counted by torch.utils.flop_counter."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The card's dense peak FLOP/s for the precision's dtype (DENSE_PEAKS, else Lightning's table); None where
    unknown (CPUs)."""
    dtype = PRECISION_DTYPES.get(str(precision), torch.float32)
    if device.type != "cuda":
        return None
    if dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device).lower()
        for part, peak in DENSE_PEAKS:
            if part in name:
                return peak
    return get_available_flops(device, dtype)


class Throughput(Callback):
    """Logs perf/iterations_per_s, perf/samples_per_s and perf/mfu (see the module docstring)."""

    def __init__(self, count_iterations: int | None = None):
        self.count_iterations = count_iterations  # default: 1 + the fake-only iterations of one update cycle
        self.flops_per_iteration: float | None = None
        self._counted: list[int] = []
        self._counter: FlopCounterMode | None = None
        self._last: tuple[float, int] | None = None  # (time, iteration) at the last logging step

    def _cycle(self, pl_module) -> int:
        if self.count_iterations is not None:
            return self.count_iterations
        ratio = int(getattr(pl_module.hparams, "fake_updates_per_generator_update", 1) or 1)
        return ratio * getattr(getattr(pl_module, "optim", None), "accumulate", 1)  # batches of one update cycle

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.flops_per_iteration is None:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counted.append(self._counter.get_total_flops())
            self._counter = None
            if len(self._counted) == self._cycle(pl_module):
                self.flops_per_iteration = sum(self._counted) / len(self._counted)
            return
        if self.flops_per_iteration is None or (batch_idx + 1) % sync_every(trainer):
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        now = (time.perf_counter(), batch_idx)
        if self._last is not None and now[1] > self._last[1]:
            seconds = (now[0] - self._last[0]) / (now[1] - self._last[1])
            samples = batch["z"].shape[0] * trainer.world_size
            metrics = {"perf/iterations_per_s": 1 / seconds, "perf/samples_per_s": samples / seconds}
            peak = peak_flops(trainer.strategy.root_device, trainer.precision)
            if peak:
                metrics["perf/mfu"] = self.flops_per_iteration / seconds / peak
            pl_module.log_dict(metrics, on_step=True, rank_zero_only=True)
        self._last = now


class FastMath(Callback):
    """Settings that speed up CUDA training without changing the method: `tf32` lets float32 matmuls and
    convolutions use TF32 tensor cores (torch.set_float32_matmul_precision("high"); bf16-mixed training keeps
    its float32 parts, e.g. the optimizer, in float32), `channels_last` stores the networks' 4-D weights in
    channels-last order, which cuDNN's fastest convolution kernels read (activations follow the weights). Both
    are numerically checked against the default on the CPU (tests/test_perf.py); their speed is a GPU matter."""

    def __init__(self, tf32: bool = True, channels_last: bool = False):
        self.tf32, self.channels_last = tf32, channels_last

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
        if self.tf32:
            torch.set_float32_matmul_precision("high")
            torch.backends.cudnn.allow_tf32 = True
        if self.channels_last:
            pl_module.to(memory_format=torch.channels_last)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        torch.set_float32_matmul_precision(self._before[0])  # process-wide settings: as they were
        torch.backends.cudnn.allow_tf32 = self._before[1]


class Timer(LightningTimer):
    """Lightning's Timer (the one `Trainer(max_time=...)` makes; the same arguments), checked every
    `log_every_n_steps` training batches under DDP: each check broadcasts rank 0's verdict, a host synchronisation
    under NCCL, so a run stops at most that many batches after its time is up."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.world_size > 1 and batch_idx % sync_every(trainer):
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

