import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler

from dmd_lightning import PretrainedUNetDenoiser, UNetDenoiser, guided
from dmd_lightning.loading import WeightsNotFoundError


def test_unet_denoiser_returns_x0_from_the_unets_parameterization():
    unet, schedule = tiny_unet()
    d = UNetDenoiser(unet, schedule)
    x_t, t, y = torch.randn(3, 1, 16, 16), torch.tensor([5, 500, 999]), torch.tensor([0, 3, 9])
    eps = unet(x_t, t, class_labels=y).sample
    torch.testing.assert_close(d(x_t, t, y), schedule.to_x0(eps, x_t, t))
    assert d.null_label == 10 and (d.null_cond(y) == 10).all()


def test_guidance_extrapolates_from_the_unconditional_prediction():
    unet, schedule = tiny_unet()
    d = UNetDenoiser(unet, schedule)
    x_t, t, y = torch.randn(2, 1, 16, 16), torch.tensor([400, 400]), torch.tensor([1, 2])
    torch.testing.assert_close(guided(d, x_t, t, y, 1.0), d(x_t, t, y))
    c, u = d(x_t, t, y), d(x_t, t, d.null_cond(y))
    torch.testing.assert_close(guided(d, x_t, t, y, 3.0), u + 3.0 * (c - u), rtol=1e-4, atol=1e-4)


def test_pretrained_denoiser_loads_a_saved_folder(tmp_path):
    unet, _ = tiny_unet(prediction_type="v_prediction")
    unet.save_pretrained(tmp_path / "unet")
    DDPMScheduler(prediction_type="v_prediction").save_pretrained(tmp_path / "scheduler")
    d = PretrainedUNetDenoiser(str(tmp_path))
    assert d.schedule.prediction_type == "v_prediction"
    x = torch.randn(1, 1, 16, 16)
    torch.testing.assert_close(d.unet(x, torch.tensor([3]), class_labels=torch.tensor([1])).sample,
                               unet(x, torch.tensor([3]), class_labels=torch.tensor([1])).sample)


def test_missing_weights_give_one_clear_error(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="no-such-org/no-such-model"):
        PretrainedUNetDenoiser("no-such-org/no-such-model")
    with pytest.raises(WeightsNotFoundError, match="local folder"):
        PretrainedUNetDenoiser(str(tmp_path))


def test_predict_is_the_unets_own_output_and_guidance_agrees_across_parameterizations():
    unet, schedule = tiny_unet()
    d = UNetDenoiser(unet, schedule)
    x_t, t, y = torch.randn(2, 1, 16, 16), torch.tensor([300, 700]), torch.tensor([4, 7])
    torch.testing.assert_close(d.predict(x_t, t, y), unet(x_t, t, class_labels=y).sample)
    eps = guided(d, x_t, t, y, 2.5, native=True)
    torch.testing.assert_close(schedule.to_x0(eps, x_t, t), guided(d, x_t, t, y, 2.5), rtol=1e-4, atol=1e-4)
