import pytest
import torch
from diffusers import DDPMScheduler

from dmd_lightning import VPSchedule
from dmd_lightning.schedule import PREDICTION_TYPES


@pytest.mark.parametrize("beta_schedule,start,end", [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012),
                                                      ("squaredcos_cap_v2", 1e-4, 0.02)])
def test_alphas_cumprod_match_diffusers(beta_schedule, start, end):
    ref = DDPMScheduler(beta_schedule=beta_schedule, beta_start=start, beta_end=end)
    ours = VPSchedule(beta_schedule=beta_schedule, beta_start=start, beta_end=end)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.float(), rtol=1e-5, atol=1e-7)
    t = torch.tensor([0, 10, 500, 999])
    alpha, sigma = ours.alpha_sigma(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(4))


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("beta_schedule,start,end", [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012)])
def test_add_noise_matches_diffusers_at_every_integer_timestep(beta_schedule, start, end, zero_snr):
    kw = dict(beta_schedule=beta_schedule, beta_start=start, beta_end=end, rescale_betas_zero_snr=zero_snr)
    ref = DDPMScheduler(**kw, prediction_type="v_prediction")
    ours = VPSchedule(**kw, prediction_type="v_prediction")
    t = torch.arange(ours.T)  # near T-1 of the zero-SNR schedule alpha_t is 1e-4 and less: no floor may stand in
    x0, eps = torch.randn(ours.T, 3), torch.randn(ours.T, 3)
    torch.testing.assert_close(ours.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), rtol=1e-5, atol=1e-5)
    alpha, _ = ours.alpha_sigma(t)
    torch.testing.assert_close(alpha, ref.alphas_cumprod.float().sqrt(), rtol=1e-4, atol=1e-9)


def test_unknown_schedule_and_prediction_type_are_refused():
    with pytest.raises(ValueError, match="beta_schedule"):
        VPSchedule(beta_schedule="cosine")
    with pytest.raises(ValueError, match="prediction_type"):
        VPSchedule(prediction_type="score")


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_parameterizations_round_trip_and_match_definitions(kind):
    s = VPSchedule()
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([1, 100, 600, 999])
    x_t = s.add_noise(x0, eps, t)
    pred = s.from_x0(x0, x_t, t, kind)
    alpha, sigma = (v.view(-1, 1, 1, 1) for v in s.alpha_sigma(t))
    expected = {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0}[kind]
    torch.testing.assert_close(pred, expected, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(s.to_x0(pred, x_t, t, kind), x0, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_loss_weight_turns_x0_error_into_the_teachers_own_loss(kind):
    s = VPSchedule()
    x0, eps = torch.randn(5, 2), torch.randn(5, 2)
    t = torch.tensor([3, 50, 400, 800, 990])
    x_t = s.add_noise(x0, eps, t)
    x0_hat = x0 + 0.1 * torch.randn_like(x0)
    native = (s.from_x0(x0_hat, x_t, t, kind) - s.from_x0(x0, x_t, t, kind)).pow(2).sum(1)
    torch.testing.assert_close(s.loss_weight(t, kind) * (x0_hat - x0).pow(2).sum(1), native, rtol=1e-3, atol=1e-5)


def test_score_of_a_gaussian_is_exact():
    # x0 ~ N(0, I): p_t = N(0, I) for VP, so the score is -x_t and D(x_t) = alpha x_t.
    s = VPSchedule()
    t = torch.tensor([10, 500, 900])
    x_t = torch.randn(3, 4)
    alpha, _ = s.alpha_sigma(t)
    torch.testing.assert_close(s.score(alpha[:, None] * x_t, x_t, t), -x_t, rtol=1e-4, atol=1e-4)


def test_fractional_timesteps_interpolate_between_neighbours():
    s = VPSchedule()
    a_lo, _ = s.alpha_sigma(torch.tensor([500]))
    a_hi, _ = s.alpha_sigma(torch.tensor([501]))
    a_mid, _ = s.alpha_sigma(torch.tensor([500.5]))
    assert a_hi < a_mid < a_lo
    torch.testing.assert_close(s.alpha_sigma(torch.tensor([500.0]))[0], a_lo)


def test_sample_t_stays_in_range():
    t = VPSchedule().sample_t(10_000, 0.02, 0.98)
    assert t.min() >= 20 and t.max() <= 980 and t.dtype == torch.long


def test_from_pretrained_reads_a_diffusers_scheduler_folder(tmp_path):
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  prediction_type="v_prediction").save_pretrained(tmp_path / "scheduler")
    s = VPSchedule.from_pretrained(tmp_path)
    assert s.prediction_type == "v_prediction" and s.beta_schedule == "scaled_linear"


def test_zero_terminal_snr_matches_diffusers_and_ends_in_pure_noise():
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    s = VPSchedule(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    torch.testing.assert_close(s.alphas_cumprod, ref.alphas_cumprod.float(), rtol=1e-4, atol=1e-6)
    alpha, sigma = s.alpha_sigma(torch.tensor([0, s.T - 1]))
    assert float(alpha[1]) == 0.0 and float(sigma[1]) == 1.0
    assert float(alpha[0]) == pytest.approx(float(VPSchedule().alpha_sigma(torch.tensor([0]))[0]), rel=1e-6)
    x0, eps = torch.randn(2, 4), torch.randn(2, 4)
    t = torch.tensor([s.T - 1, s.T - 1])
    x_t = s.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, eps)  # x_{T-1} is the noise itself
    torch.testing.assert_close(s.to_x0(s.from_x0(x0, x_t, t), x_t, t), x0)  # v-prediction: x0 = -v there
    assert s.config["rescale_betas_zero_snr"] and VPSchedule.from_config(s.config).zero_terminal_snr


def test_zero_terminal_snr_refuses_epsilon_prediction_and_samplers_that_ignore_it():
    from dmd_lightning.samplers import make_scheduler

    with pytest.raises(ValueError, match="v_prediction"):
        VPSchedule(rescale_betas_zero_snr=True)
    s = VPSchedule(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        make_scheduler("pndm", s.config)
    scheduler = make_scheduler("ddim", s.config)
    scheduler.set_timesteps(50)
    assert int(scheduler.timesteps[0]) == s.T - 1  # trailing spacing starts at the pure-noise step
