"""`make bench`: speed and memory of the project's code paths as ratios, each measured side by side in one run.

python -m dmd_lightning.tools.bench [--quick] [--out runs/bench] [--sd15] [--threads 1]

Rows, per model: (1) one-step generation vs the teacher's sampler on the same batch and noise, wall-time ratio
beside the ratio of network evaluations (counted by a hook on the UNet: a CFG step batched as 2x counts 2);
(2) a DMD training iteration driven by Lightning's Trainer vs the sum of the network passes it needs, each timed
alone; (3) pair generation by PairGenerator vs diffusers' own loop (DDIMPipeline for unconditional UNets);
(4) peak memory of a training step with and without gradient checkpointing; (5) the generator's training state
(parameters, gradients, AdamW state) with LoRA vs full fine-tuning, exact bytes; (6) a DMD iteration with the networks
compiled vs eager, and for fmnist a DMD2 iteration (GAN, four steps) too. Every figure is a median after a
warm-up. Writes bench.md and bench.json under --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Callable

import torch
from lightning import Callback, Trainer
from torch import Tensor
from torch.utils.data import DataLoader

from dmd_lightning.data.generation import PairGenerator
from dmd_lightning.denoisers import guided
from dmd_lightning.gan import GANLoss
from dmd_lightning.generator import MultiStepGenerator, OneStepGenerator
from dmd_lightning.losses import DMLoss, L2Loss
from dmd_lightning.module import DMDModule
from dmd_lightning.optim import Optimization, make_adamw
from dmd_lightning.perf import Compilation
from dmd_lightning.samplers import make_scheduler, sample_ode
from dmd_lightning.tools.bench_cases import (
    SD15_UNET,
    Case,
    autocast,
    count_nfe,
    interleaved_medians,
    make_case,
    median,
    median_time,
    silence,
    training_state_bytes,
)
from dmd_lightning.tools.bench_report import DMD_STEP_TARGET, PAIRS_TARGET, machine, markdown


# ------------------------------------------------------------------------------------ 1. one step vs sampler
@torch.no_grad()
def bench_one_step(case: Case, repeat: int = 3, warmup: int = 1) -> dict:
    """One-step generator vs the teacher's ODE sampler (case.sampler, case.steps, CFG case.guidance)."""
    b, teacher = case.batch, case.teacher
    z, cond = case.noise(b), case.make_cond(b)
    gen = OneStepGenerator(teacher)  # the generator at initialization: the same network as the student
    one_step = lambda: gen(z, cond)  # noqa: E731
    sampler = lambda: sample_ode(teacher, z, make_scheduler(case.sampler, teacher.schedule.config),  # noqa: E731
                                 case.steps, cond, case.guidance)
    with autocast():
        nfe_one, nfe_sampler = count_nfe(teacher.unet, b, one_step), count_nfe(teacher.unet, b, sampler)
        t_one, t_sampler = interleaved_medians([one_step, sampler], repeat, warmup)
    wall, nfe = t_sampler / t_one, nfe_sampler / nfe_one
    return {"batch": b, "sampler": f"{case.sampler} {case.steps} steps, guidance {case.guidance}",
            "one_step_s": t_one, "sampler_s": t_sampler, "nfe_one_step": nfe_one, "nfe_sampler": nfe_sampler,
            "wall_ratio": wall, "nfe_ratio": nfe, "wall_over_nfe": wall / nfe}


# ------------------------------------------------------------------------------- 2. DMD step vs its passes
class StepTimer(Callback):
    """Wall time of each training iteration, on_train_batch_start to on_train_batch_end; `between()` runs after
    each iteration, outside the timed window."""

    def __init__(self, between: Callable[[], None] | None = None):
        self.times: list[float] = []
        self.between = between

    def on_train_batch_start(self, *args) -> None:
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        self.times.append(time.perf_counter() - self.start)
        if self.between is not None:
            self.between()


def dmd_batch(case: Case) -> dict:
    """A DM batch of fresh noise and a regression batch of (noise, image) pairs, both of case.batch."""
    b = case.batch
    batch = {"z": case.noise(b, 1), "pair_z": case.noise(b, 2), "pair_x": case.noise(b, 3).clamp(-1, 1)}
    cond, pair_cond = case.make_cond(b), case.make_cond(b)
    return {**batch, **({"cond": cond, "pair_cond": pair_cond} if cond is not None else {})}


def dmd_module(case: Case, checkpointing: bool = False, compile_backend: str | None = None) -> DMDModule:
    teacher = copy.deepcopy(case.teacher)
    if checkpointing:  # the generator and the fake score are copies of the teacher: they inherit it
        teacher.unet.enable_gradient_checkpointing()
    return DMDModule(teacher, dm_loss=DMLoss(guidance_scale=case.guidance), regression_loss=L2Loss(),
                     optim=Optimization(warmup_steps=1),
                     compile=Compilation(compile_backend) if compile_backend is not None else None)


def dmd2_batch(case: Case) -> dict:
    """A DM batch of fresh noise and a batch of 'real' images (noise clamped to [-1, 1]) with their conditions."""
    b = case.batch
    batch = {"z": case.noise(b, 1), "real_x": case.noise(b, 2).clamp(-1, 1)}
    cond, real_cond = case.make_cond(b), case.make_cond(b)
    return {**batch, **({"cond": cond, "real_cond": real_cond} if cond is not None else {})}


def dmd2_module(case: Case, compile_backend: str | None = None, steps=(999, 749, 499, 249)) -> DMDModule:
    """DMD2 as configs/fmnist_dmd2_4step.yaml trains it (GAN on the fake score's bottleneck, a 4-step generator with
    backward simulation, no regression), but with one fake-score update per generator update: every timed iteration
    then runs the same passes (the step index, and so the backward simulation's length, still varies, drawn alike on
    both sides from the module's noise seeds)."""
    teacher = copy.deepcopy(case.teacher)
    return DMDModule(teacher, MultiStepGenerator.from_teacher(teacher, steps), dm_loss=DMLoss(guidance_scale=case.guidance),
                     regression_loss=None, gan=GANLoss(), fake_updates_per_generator_update=1,
                     optim=Optimization(warmup_steps=1),
                     compile=Compilation(compile_backend) if compile_backend is not None else None)


def bench_compile(case: Case, repeat: int = 5, warmup: int = 2, backend: str = "inductor", dmd2: bool = False) -> dict:
    """A Trainer-driven DMD iteration with the networks compiled (DMDModule(compile=Compilation())) over the eager one, each
    the median after `warmup` iterations (the compiled side's include compilation, reported as compile_s); below
    1 is faster. Eager, compiled, eager again: the two eager medians bracket the compiled one against drift. dmd2: a
    DMD2 iteration (dmd2_module) instead of DMD's."""
    batch, times = (dmd2_batch if dmd2 else dmd_batch)(case), {}
    for side, compiled in (("eager", False), ("compiled", True), ("eager_again", False)):
        torch.compiler.reset()  # the graph cache is per code object: one model's graphs must not crowd another's
        module = (dmd2_module if dmd2 else dmd_module)(case, compile_backend=backend if compiled else None)
        timer = StepTimer()
        fit_steps(module, batch, warmup + repeat, [timer])
        times[side] = timer.times
    eager = median(times["eager"][warmup:] + times["eager_again"][warmup:])
    compiled = median(times["compiled"][warmup:])
    return {"batch": f"{case.batch} + {case.batch}", "backend": backend, "eager_s": eager, "compiled_s": compiled,
            "compile_s": sum(times["compiled"][:warmup]) - warmup * compiled, "ratio": compiled / eager}


def fit_steps(module: DMDModule, batch: dict, iterations: int, callbacks: list) -> None:
    """`iterations` DMD iterations (2 optimizer steps each) by Lightning's Trainer, as `dmd fit` runs them."""
    gpu = torch.cuda.is_available()
    trainer = Trainer(accelerator="gpu" if gpu else "cpu", devices=1, precision="bf16-mixed" if gpu else "32-true",
                      max_steps=2 * iterations, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(module, DataLoader([{k: v.cpu() for k, v in batch.items()}] * iterations, batch_size=None))


def network_passes(case: Case, batch: dict, module: DMDModule) -> dict[str, Callable[[], object]]:
    """Each network pass of a DMD iteration as a function, on copies of the teacher; the fake-score update
    uses the optimizer settings of `module`, the one the Trainer side runs."""
    teacher, o = case.teacher, module.optim
    gen = OneStepGenerator.from_teacher(teacher).train()
    fake = copy.deepcopy(teacher).requires_grad_(True).train()
    opt = make_adamw(fake.parameters(), o.fake_lr, tuple(o.betas), o.weight_decay)
    z, cond, pz, pc = batch["z"], batch.get("cond"), batch["pair_z"], batch.get("pair_cond")
    t = torch.full((len(z),), teacher.schedule.T // 2, device=z.device)
    x_t = teacher.schedule.add_noise(z, torch.randn_like(z), t)

    def generator_forward_backward():  # DM batch + regression batch, one backward (outside autocast, as Lightning)
        with autocast():
            loss = gen(z, cond).float().square().mean() + gen(pz, pc).float().square().mean()
        loss.backward()
        gen.zero_grad(set_to_none=True)

    @torch.no_grad()
    def real_forward():  # classifier-free guidance: one pass of 2x the batch
        with autocast():
            return guided(teacher, x_t, t, cond, case.guidance)

    @torch.no_grad()
    def fake_forward():
        with autocast():
            return fake(x_t, t, cond)

    def fake_update():
        with autocast():
            loss = fake(x_t, t, cond).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"generator forward+backward": generator_forward_backward, "real forward (CFG)": real_forward,
            "fake forward": fake_forward, "fake-score update": fake_update}


def bench_dmd_step(case: Case, repeat: int = 5, warmup: int = 2) -> dict:
    """A Trainer-driven DMD iteration vs the sum of its network passes, each timed alone; target <= 1.15.
    The passes run between the Trainer's iterations, so both sides see the same machine load."""
    batch, module = dmd_batch(case), dmd_module(case)
    passes = network_passes(case, batch, module)
    pass_times: dict[str, list[float]] = {k: [] for k in passes}

    def time_passes() -> None:
        for k, fn in passes.items():
            pass_times[k].append(median_time(fn, 1, 0))

    timer = StepTimer(time_passes)
    fit_steps(module, batch, warmup + repeat, [timer])
    step, times = median(timer.times[warmup:]), {k: median(v[warmup:]) for k, v in pass_times.items()}
    total = sum(times.values())
    return {"batch": f"{case.batch} DM + {case.batch} regression", "step_s": step, "passes_s": times,
            "sum_s": total, "ratio": step / total, "target": DMD_STEP_TARGET, "met": step / total <= DMD_STEP_TARGET}


# ----------------------------------------------------------------------------------- 3. pairs vs diffusers
@torch.no_grad()
def diffusers_loop(unet, scheduler, noise: Tensor, steps: int, cond=None, null=None, guidance: float = 1.0) -> Tensor:
    """diffusers' sampling loop as its pipelines write it (DDIMPipeline; StableDiffusionPipeline's CFG):
    unet on the (doubled) latents, guidance on its output, scheduler.step."""
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    cfg = guidance != 1.0 and null is not None
    text = "cross_attention_dim" in unet.config
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(torch.cat([x, x]) if cfg else x, t)
        c = torch.cat([null, cond]) if cfg else cond
        out = unet(x_in, t, encoder_hidden_states=c).sample if text else unet(x_in, t, class_labels=c).sample
        if cfg:
            uncond, conditional = out.chunk(2)
            out = uncond + guidance * (conditional - uncond)
        x = scheduler.step(out, t, x).prev_sample
    return x


def bench_pairs(case: Case, repeat: int = 3, warmup: int = 1) -> dict:
    """PairGenerator.predict_step vs diffusers on the same UNet, scheduler, steps, batch and noise (images/s)."""
    from diffusers import DDIMPipeline

    b, teacher = case.batch, case.teacher
    noise, cond = case.noise(b), case.make_cond(b)
    model = PairGenerator(teacher, case.sampler, case.steps, case.guidance).to(noise.device)
    batch = {"noise": noise, **({"cond": cond} if cond is not None else {})}
    scheduler = lambda: make_scheduler(case.sampler, teacher.schedule.config)  # noqa: E731  fresh per run

    def project():  # as `dmd pairs` runs it: Lightning's predict loop wraps predict_step in inference_mode
        with torch.inference_mode():
            return model.predict_step(batch)["x"]

    if cond is None and case.sampler == "ddim":  # the pipeline itself (its noise: case.noise's seed 0)
        pipe = DDIMPipeline(teacher.unet, scheduler()).to(noise.device)
        pipe.set_progress_bar_config(disable=True)
        reference_name = "DDIMPipeline"
        reference = lambda: pipe(b, torch.Generator().manual_seed(0), num_inference_steps=case.steps,  # noqa: E731
                                 output_type="pt").images * 2 - 1  # the pipeline maps to [0, 1] and clamps
    else:
        reference_name = "diffusers pipeline loop"
        null = teacher.null_cond(cond) if cond is not None else None
        reference = lambda: diffusers_loop(teacher.unet, scheduler(), noise, case.steps, cond, null,  # noqa: E731
                                           case.guidance)
    with autocast():
        diff = (project().float().clamp(-1, 1) - reference().float().clamp(-1, 1)).abs().max().item()
        t_project, t_reference = interleaved_medians([project, reference], repeat, warmup)
    ratio = t_reference / t_project  # = (images/s project) / (images/s reference)
    return {"batch": b, "reference": reference_name, "sampler": f"{case.sampler} {case.steps} steps",
            "project_images_per_s": b / t_project, "reference_images_per_s": b / t_reference, "ratio": ratio,
            "target": PAIRS_TARGET, "met": ratio >= PAIRS_TARGET, "max_abs_diff": diff}


# ------------------------------------------------------------------------------------------ 4. peak memory
def step_peak(name: str, quick: bool, checkpointing: bool, iterations: int = 2, queue=None) -> int:
    """Bytes a Trainer-driven DMD step adds to the peak: torch's CUDA allocator on a GPU; on the CPU (in a fresh
    process) the peak RSS (VmHWM, reset by /proc/self/clear_refs) minus the RSS before it, after a warm-up fit
    (imports, kernels) and malloc_trim: torch's CPU allocations are invisible to tracemalloc."""
    case = make_case(name, quick)
    module, batch = dmd_module(case, checkpointing), dmd_batch(case)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fit_steps(module, batch, iterations, [])
        return torch.cuda.max_memory_allocated() - base
    import ctypes

    def kib(key: str) -> int:
        return next(int(ln.split()[1]) for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(key))

    fit_steps(module, batch, 1, [])
    ctypes.CDLL(None).malloc_trim(0)  # give the warm-up's freed memory back to the system
    before = kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    fit_steps(module, batch, iterations, [])
    queue.put((kib("VmHWM") - before) * 1024)


def peak_memory(name: str, quick: bool, checkpointing: bool) -> int:
    if torch.cuda.is_available():
        peak = step_peak(name, quick, checkpointing)
        torch.cuda.empty_cache()
        return peak
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(torch.get_num_threads(), name, quick, checkpointing, 2, queue))
    proc.start()
    peak = queue.get(timeout=600)
    proc.join()
    return peak


def _child(threads: int, *args) -> None:
    silence()
    torch.set_num_threads(threads)
    step_peak(*args)


def bench_memory(name: str, quick: bool = False) -> dict:
    """Peak memory of a DMD step with and without gradient checkpointing (generator and fake score)."""
    kind = "CUDA max_memory_allocated" if torch.cuda.is_available() else "peak RSS - RSS before (CPU)"
    on, off = peak_memory(name, quick, True), peak_memory(name, quick, False)
    return {"kind": kind, "with_checkpointing_bytes": on, "without_checkpointing_bytes": off,
            "ratio": on / off if off > 0 else float("nan")}


# ------------------------------------------------------------------------------ 5. LoRA vs full fine-tuning
def bench_lora(case: Case, rank: int = 64) -> dict:
    """The generator's parameters + gradients + AdamW state with LoRA (rank 64, alpha 8: LoRADenoiser's defaults)
    over those of full fine-tuning. Activations are not counted. tiny-sd counts the full-width SD1.5 layout it
    stands for in the timed rows: counting needs no compute."""
    unet = case.teacher.unet
    sd15 = case.name in ("tiny-sd", "sd15")
    full, lora = (training_state_bytes(type(unet), SD15_UNET if sd15 else unet.config, r) for r in (None, rank))
    return {"unet": "SD1.5 layout" if sd15 else case.name, "rank": rank, "full": full, "lora": lora,
            "ratio": sum(lora.values()) / sum(full.values())}


def run(names: list[str], quick: bool = False) -> dict:
    """Every row for every case; quick: fewer repetitions and smaller batches."""
    repeat, warmup = (1, 1) if quick else (3, 1)
    results = {}
    for name in names:
        case = make_case(name, quick)
        print(f"== {name}", flush=True)
        results[name] = {"one_step": bench_one_step(case, repeat, warmup),
                         "dmd_step": bench_dmd_step(case, 2 if quick else 9, 1 if quick else 2),
                         "pairs": bench_pairs(case, 1 if quick else 5, warmup), "memory": bench_memory(name, quick),
                         "lora": bench_lora(case), **({} if quick else {"compile": bench_compile(case)})}
        if name == "fmnist" and not quick:  # the DMD2 configs' iteration: the GAN's pass through the encoder half too
            results[name]["compile_dmd2"] = bench_compile(case, dmd2=True)
        del case
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--quick", action="store_true", help="fewer repetitions, smaller batches")
    p.add_argument("--models", nargs="+", default=["fmnist", "tiny-sd", "tiny"])
    p.add_argument("--sd15", action="store_true", help="also an SD1.5-architecture UNet (random weights; CUDA only)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default). 1 by default: on a small machine shared with other "
                        "jobs, intra-op threads wait on each other and every figure becomes noise")
    a = p.parse_args(argv)
    silence()
    if a.threads > 0 and not torch.cuda.is_available():
        torch.set_num_threads(a.threads)
    names = list(a.models) + (["sd15"] if a.sd15 and torch.cuda.is_available() else [])
    if a.sd15 and not torch.cuda.is_available():
        print("--sd15 needs CUDA; skipped")
    info = machine()
    results = run(names, a.quick)
    table = markdown(results, info)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(table)
    (out / "bench.json").write_text(json.dumps({"machine": info, "quick": a.quick, "results": results}, indent=2))
    print("\n" + table + f"\nwritten: {out / 'bench.md'}, {out / 'bench.json'}")
    return results


if __name__ == "__main__":
    main()
