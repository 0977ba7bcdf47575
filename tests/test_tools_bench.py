"""`make bench` in quick mode on tiny random models: the structure of every row, exact NFE counts, no timings."""

import math

import pytest
import torch

from dmd_lightning.tools import bench


def positive(v) -> bool:
    return isinstance(v, float) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    bench.silence()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def memory() -> dict:
    """The memory row, measured once for the tests that report it (about 20 s on the CPU)."""
    return bench.bench_memory("tiny", quick=True)


@pytest.mark.parametrize("guidance, nfe", [(1.0, 50), (3.0, 100)])
def test_one_step_counts_evaluations_and_guidance(guidance, nfe):
    case = bench.make_case("tiny-sd", quick=True)
    case.sampler, case.guidance = "ddim", guidance  # DDIM: one evaluation per step; CFG batched as 2x: two
    r = bench.bench_one_step(case, repeat=1, warmup=0)
    assert (r["nfe_one_step"], r["nfe_sampler"], r["nfe_ratio"]) == (1, nfe, nfe)
    assert all(positive(r[k]) for k in ("one_step_s", "sampler_s", "wall_ratio", "wall_over_nfe"))
    assert r["wall_over_nfe"] == pytest.approx(r["wall_ratio"] / nfe)


def test_dmd_step_and_pairs_rows():
    case = bench.make_case("tiny", quick=True)
    d = bench.bench_dmd_step(case, repeat=1, warmup=1)
    assert set(d["passes_s"]) == {"generator forward+backward", "real forward (CFG)", "fake forward",
                                  "fake-score update"}
    assert all(positive(v) for v in [*d["passes_s"].values(), d["step_s"], d["sum_s"], d["ratio"]])
    assert d["met"] == (d["ratio"] <= bench.DMD_STEP_TARGET)
    p = bench.bench_pairs(case, repeat=1, warmup=0)
    assert p["reference"] == "DDIMPipeline"  # unconditional: diffusers' own pipeline
    assert all(positive(p[k]) for k in ("project_images_per_s", "reference_images_per_s", "ratio"))
    assert p["max_abs_diff"] < 1e-3  # same noise, scheduler and UNet: the same samples


def test_pairs_against_the_pipeline_loop_with_guidance():
    case = bench.make_case("tiny-sd", quick=True)
    case.steps = 5
    p = bench.bench_pairs(case, repeat=1, warmup=0)
    assert p["reference"] == "diffusers pipeline loop" and positive(p["ratio"])
    assert p["max_abs_diff"] < 1e-3


def test_memory_and_report(tmp_path, memory):
    mem = memory
    on, off = mem["with_checkpointing_bytes"], mem["without_checkpointing_bytes"]
    assert isinstance(on, int) and isinstance(off, int)  # peak RSS growth on the CPU: noisy, so no order asserted
    assert mem["ratio"] == on / off if off > 0 else math.isnan(mem["ratio"])
    assert mem["kind"] == ("CUDA max_memory_allocated" if torch.cuda.is_available() else "peak RSS - RSS before (CPU)")
    one = bench.bench_one_step(bench.make_case("tiny", quick=True), repeat=1, warmup=0)
    assert one["nfe_ratio"] == 50
    row = {"one_step": one, "dmd_step": {"batch": "2 DM + 2 regression", "passes_s": {"a": 0.1, "b": 0.2},
                                         "sum_s": 0.3, "step_s": 0.33, "ratio": 1.1, "met": True},
           "pairs": {"reference": "DDIMPipeline", "sampler": "ddim 50 steps", "batch": 2, "project_images_per_s": 1.0,
                     "reference_images_per_s": 1.0, "ratio": 1.0, "met": True, "max_abs_diff": 0.0},
           "memory": mem, "lora": bench.bench_lora(bench.make_case("tiny", quick=True), rank=2)}
    text = bench.markdown({"tiny": row}, bench.machine())
    assert text.count("\n## ") == 5 and "| tiny |" in text and "50x" in text


def test_lora_training_state_counts_adapters_gradients_and_adam_exactly():
    """Full fine-tuning: gradients = parameters, AdamW's two moments twice that (+ its step counters); LoRA: the
    frozen base plus the adapters, gradients and moments of the adapters alone. SD1.5's layout: about a third."""
    r = bench.bench_lora(bench.make_case("tiny", quick=True), rank=2)
    full, lora = r["full"], r["lora"]
    assert full["gradients"] == full["parameters"] and 0 <= full["optimizer"] - 2 * full["gradients"] < 4096
    assert lora["parameters"] == full["parameters"] + lora["gradients"] and 0 < lora["gradients"] < full["gradients"]
    assert 0 <= lora["optimizer"] - 2 * lora["gradients"] < 4096
    assert r["ratio"] == pytest.approx(sum(lora.values()) / sum(full.values()))
    sd15 = bench.bench_lora(bench.make_case("tiny-sd", quick=True))
    assert sd15["unet"] == "SD1.5 layout" and sd15["full"]["parameters"] > 3e9 and 0.25 < sd15["ratio"] < 0.4


def test_compile_row_times_eager_and_compiled_iterations_and_reports_them(memory):
    """aot_eager: the graphs are captured (compile=True's path) without generating code, quick on a CPU."""
    case = bench.make_case("tiny", quick=True)
    r = bench.bench_compile(case, repeat=1, warmup=1, backend="aot_eager")
    assert positive(r["eager_s"]) and positive(r["compiled_s"]) and r["ratio"] == r["compiled_s"] / r["eager_s"]
    r2 = bench.bench_compile(case, repeat=1, warmup=1, backend="aot_eager", dmd2=True)  # GAN, four steps
    assert positive(r2["eager_s"]) and positive(r2["compiled_s"])
    text = bench.markdown({"tiny": {"one_step": bench.bench_one_step(case, repeat=1, warmup=0),
                                    "dmd_step": {"batch": "2 + 2", "passes_s": {"a": 0.1}, "sum_s": 0.1,
                                                 "step_s": 0.1, "ratio": 1.0, "met": True},
                                    "pairs": {"reference": "x", "sampler": "ddim", "batch": 2,
                                              "project_images_per_s": 1.0, "reference_images_per_s": 1.0,
                                              "ratio": 1.0, "met": True, "max_abs_diff": 0.0},
                                    "memory": memory,
                                    "lora": bench.bench_lora(case, rank=2), "compile": r, "compile_dmd2": r2}},
                          bench.machine())
    assert "6. A DMD iteration with the networks compiled" in text and "| aot_eager |" in text
    assert "| tiny DMD2 | 2 + 2 | aot_eager |" in text
