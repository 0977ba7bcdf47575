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
