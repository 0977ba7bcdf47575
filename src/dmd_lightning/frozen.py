"""Networks that never train (the teacher, the regression loss's and the metrics' networks): kept in eval mode through
Lightning's `.train()` calls, and left out of checkpoints, which then take their weights from their own files."""

from __future__ import annotations

from torch import nn


class EvalOnly(nn.Module):
    """A network that stays in eval mode: Lightning calls `.train()` on every submodule when training starts."""

    def train(self, mode: bool = True):
        return super().train(False)


def drop_frozen(state: dict, prefixes: tuple[str, ...]) -> None:
    """Removes the frozen networks' weights (state-dict keys under `prefixes`) from a checkpoint's state dict: at
    SD1.5 scale the teacher alone is 3.4 GB."""
    for k in [k for k in state if k.startswith(prefixes)]:
        del state[k]


def fill_frozen(module: nn.Module, state: dict, prefixes: tuple[str, ...]) -> dict:
    """Completes a checkpoint's state dict with the frozen networks' weights as `module` holds them (loaded from
    their own files); a checkpoint that holds them keeps its own."""
    for prefix in prefixes:
        net = getattr(module, prefix.rstrip("."), None)
        if isinstance(net, nn.Module):
            for k, v in net.state_dict(prefix=prefix).items():
                state.setdefault(k, v)
    return state
