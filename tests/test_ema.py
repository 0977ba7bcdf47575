"""The generator's EMA: one foreach update over parameters and buffers, with a warm-up of its decay."""

import pytest
import torch
from torch import nn

from dmd_lightning.ema import EMA, ema_tensors, ema_update, warmup_decay


def test_warmup_decay_follows_the_model_early_and_caps_at_the_decay():
    assert warmup_decay(0.995, 0) == pytest.approx(0.1)
    assert warmup_decay(0.995, 90) == pytest.approx(0.91)
    assert warmup_decay(0.995, 10_000) == 0.995
    assert [warmup_decay(0.999, n) for n in range(5)] == sorted(warmup_decay(0.999, n) for n in range(5))


def test_update_averages_floats_and_copies_counters():
    model, ema = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.fill_(2.0)
    model.num_batches_tracked.fill_(7)
    ema_update(ema_tensors(ema, model), 0.75)
    torch.testing.assert_close(ema.weight, torch.full((3,), 0.75 * 1.0 + 0.25 * 2.0))
    assert int(ema.num_batches_tracked) == 7


@pytest.mark.parametrize("warmup, decay", [(True, 0.1), (False, 0.75)])
def test_ema_uses_the_warmed_up_decay_and_rebuilds_its_lists_after_reset(warmup, decay):
    model, ema = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(2.0), ema.weight.fill_(1.0)
    averager = EMA(ema, model, 0.75, warmup=warmup)
    averager.update(0)  # warmup_decay(0.75, 0) = 0.1
    torch.testing.assert_close(ema.weight, torch.full((2, 2), decay * 1.0 + (1 - decay) * 2.0))
    ema.weight = nn.Parameter(torch.zeros(2, 2))  # as a device move replaces tensors
    averager.reset()
    averager.update(10_000)
    torch.testing.assert_close(ema.weight, torch.full((2, 2), 0.25 * 2.0))
