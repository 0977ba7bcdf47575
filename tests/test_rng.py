import torch

from dmd_lightning.rng import rng_states, set_rng_states


def test_cuda_rng_state_is_this_devices_and_restores_on_a_machine_with_fewer_gpus(monkeypatch):
    """Saved: the state of this rank's device only; restored onto this rank's device, also from checkpoints that
    hold one state per visible GPU (before), on a machine with fewer of them."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([1], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: restored.append(int(state[0])))
    states = rng_states()
    assert [int(s[0]) for s in states["cuda"]] == [1]
    set_rng_states(states)
    set_rng_states({**states, "cuda": [torch.tensor([d], dtype=torch.uint8) for d in range(8)]})  # 8 GPUs then, 2 now
    assert restored == [1, 1]
