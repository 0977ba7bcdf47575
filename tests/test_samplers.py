import pytest
import torch

from dmd_lightning import VPSchedule
from dmd_lightning.samplers import SCHEDULERS, make_scheduler, sample_ode
from dmd_lightning.toy2d.mixture import GaussianMixtureDenoiser, get_mixture, mode_statistics


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_sampler_solves_the_exact_mixture_ode(name):
    schedule = VPSchedule()
    teacher = GaussianMixtureDenoiser(schedule)
    calls = []
    x = sample_ode(teacher, torch.randn(4096, 2), make_scheduler(name, schedule.config), 50,
                   callback=lambda i, t, x0: calls.append(i))
    m = mode_statistics(x, *get_mixture("ring8"))
    assert m["tv"] < 0.05 and m["coverage"] == 1.0 and 0.8 < m["std_ratio"] < 1.2, m
    assert len(calls) >= 50


def test_sampler_is_deterministic_and_unknown_names_are_refused():
    schedule = VPSchedule()
    teacher = GaussianMixtureDenoiser(schedule)
    z = torch.randn(16, 2)
    a = sample_ode(teacher, z, make_scheduler("ddim", schedule.config), 10)
    b = sample_ode(teacher, z, make_scheduler("ddim", schedule.config), 10)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("ancestral", schedule.config)


def test_native_and_converted_model_outputs_give_the_same_samples():
    """An epsilon teacher: a DDIM scheduler of epsilon takes the network's output as is (the fast path), one of
    'sample' takes the converted x0; both integrate the same ODE."""
    schedule = VPSchedule()
    teacher = GaussianMixtureDenoiser(schedule)
    z = torch.randn(256, 2)
    a = sample_ode(teacher, z, make_scheduler("ddim", schedule.config), 20)
    b = sample_ode(teacher, z, make_scheduler("ddim", schedule.config, prediction_type="sample"), 20)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["ddim", "pndm"])
def test_samplers_take_the_teachers_steps_offset_and_final_alpha(name):
    """Stable Diffusion 1.5's scheduler config (steps_offset 1, set_alpha_to_one false): the sampler built on the
    teacher's schedule takes diffusers' own timesteps (981, 961, ..., 1 at 50 steps, not 980, ..., 0) and final
    alpha, as the pipeline with that scheduler does."""
    import diffusers

    sd15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False)
    ours = make_scheduler(name, VPSchedule.from_config(sd15).config)
    reference = getattr(diffusers, SCHEDULERS[name][0]).from_config(sd15)
    for scheduler in (ours, reference):
        scheduler.set_timesteps(50)
    assert torch.equal(ours.timesteps, reference.timesteps) and int(ours.timesteps[-1]) == 1
    assert ours.final_alpha_cumprod == reference.final_alpha_cumprod == reference.alphas_cumprod[0]
