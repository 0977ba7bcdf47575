"""One network's update under manual optimization: the backward of each micro-batch's share of the loss, then, on
an update's last micro-batch, gradient clipping, the non-finite guard and the optimizer step.

The guard reads its verdict (is a loss term or the gradient non-finite?) on the host after every update
(`check="update"`), a device synchronisation per update, or leaves it on the device (`check="logging"`): the fused
AdamW then skips a bad update by itself (the `found_inf` tensor torch.amp.GradScaler hands fused optimizers), and
the host reads how many were skipped only on logging steps. Under 16-mixed GradScaler replaces that tensor with its
own, read from the gradients alone, so a non-finite loss term is first turned into a NaN gradient (`_poison`).

Lightning writes step metrics on logging iterations only (every `log_every_n_steps`), and with several fake-score
updates per generator update the generator's turn may never fall on one. So each update keeps what it would log (its
loss terms, gradient norm, lr and statistics), and `flush`, called by the module on a logging iteration, logs the
latest values of each network, then clears them.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from dmd_lightning.checks import all_finite
from dmd_lightning.errors import NonFiniteError


@dataclass(frozen=True)
class NonFinite:
    """What a non-finite loss term or gradient does to an update: `action="skip"` leaves the weights and the
    optimizer's state as they were (training stops after `max_consecutive` skips in a row, or at once if the
    network's weights are non-finite: every later update would be skipped too); `action="stop"` stops training.
    `check="update"` decides on the host after each update (a skipped update does not count towards max_steps,
    except under 16-mixed: GradScaler's own skipped step is an optimizer step to Lightning);
    `check="logging"` skips on the device without synchronising and reports (and stops) at the next logging step
    (a skipped update then still counts as a step and advances the lr schedule); the losses then go to the logger
    but not to the progress bar, whose metrics Lightning turns into numbers after every batch (a synchronisation
    each)."""

    action: str = "skip"
    max_consecutive: int = 20
    check: str = "update"


class GuardedUpdate:
    """Backward, clipping, non-finite guard and step of the network `name` ("generator" or "fake_score")."""

    def __init__(self, name: str, policy: NonFinite):
        self.name, self.policy = name, policy
        self.skips = 0  # consecutive skipped updates, as the host last knew
        self._bad: dict[str, Tensor] = {}  # per loss term: non-finite in the update in progress (device bools)
        self._pending: dict[str, Tensor] = {}  # check="logging": per term, skipped updates since the last read
        self._skipped = 0  # check="update": skipped updates since the last flush, on the host
        self._latest: dict[str, Tensor | float] = {}  # what the latest update logs at the next logging iteration
        self._where = ""  # the latest update, in words
        self._optimizer: torch.optim.Optimizer | None = None  # steps the network's (and the GAN head's) parameters

    def run(self, module, opt, sched, loss: Tensor, terms: dict[str, Tensor], last: bool,
            stats: dict[str, Tensor] | None = None) -> None:
        """This micro-batch's backward; on an update's last micro-batch, clip, guard and step. `stats`: more values
        to log with the update's terms (e.g. the DM loss's weighting)."""
        self.backward(module, loss, terms, last)
        if last:
            self.step(module, opt, sched, terms, stats or {})

    def backward(self, module, loss: Tensor, terms: dict[str, Tensor], last: bool) -> None:
        """This micro-batch's share of the update; DDP reduces the gradients once, in the last one's backward."""
        blocked = getattr(module.trainer.strategy, "block_backward_sync", nullcontext) if not last else nullcontext
        with blocked():
            module.manual_backward(loss / module.optim.accumulate)
        for k, v in terms.items():
            bad = ~torch.isfinite(v.detach())
            self._bad[k] = self._bad[k] | bad if k in self._bad else bad

    def step(self, module, opt, sched, terms: dict[str, Tensor], stats: dict[str, Tensor]) -> None:
        """Clip, guard and step (the update's last micro-batch); keeps the terms, gradient norm, lr and `stats` for
        the next `flush`."""
        scaler = getattr(module.trainer.precision_plugin, "scaler", None)
        self._optimizer = opt.optimizer
        # the optimizer's own list: walking the network's modules costs more than a small network's update
        params = [p for group in opt.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if scaler is not None:  # 16-mixed: clip and check the true gradients, not the loss-scaled ones
            self._poison(module, params)
            scaler.unscale_(opt.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, module.optim.gradient_clip)
        flags = {**self._bad, "gradient": ~torch.isfinite(grad_norm)}
        self._bad = {}
        self._latest = {**{f"{self.name}/loss_{k}": v.detach() for k, v in terms.items()},
                        f"{self.name}/grad_norm": grad_norm, f"{self.name}/lr": sched.get_last_lr()[0], **stats}
        where = self._where = f"{self.name} update at iteration {module.iteration} (global step {module.global_step})"
        if self.policy.check == "update" or not opt.optimizer.param_groups[0].get("fused"):
            bad = [k for k, v in flags.items() if v]  # host synchronisation
            # every rank must take the same decision, or the replicas drift apart
            if module.trainer.strategy.reduce_boolean_decision(bool(bad), all=False) and not bad:
                bad.append("loss or gradient on another rank")
            if self._skip(bad, where):
                module.print(f"warning: non-finite {', '.join(bad)} in the {where}; update skipped")
                self._skipped += 1
                if scaler is not None and "gradient" in bad:  # GradScaler skips it too, and lowers its loss scale
                    opt.step()
            else:
                opt.step()
                sched.step()
        else:
            found_inf = torch.stack(list(flags.values())).any().float()
            if module.trainer.world_size > 1:  # the same decision on every rank, without a host synchronisation
                torch.distributed.all_reduce(found_inf, op=torch.distributed.ReduceOp.MAX)  # (strategy.reduce
                # would add a barrier, which blocks the host under NCCL)
            opt.optimizer.found_inf = found_inf  # the fused kernel leaves weights, moments and step count alone
            try:  # (under 16-mixed GradScaler sets and removes its own, from the gradients: see _poison)
                opt.step()
            finally:
                opt.optimizer.__dict__.pop("found_inf", None)
            sched.step()
            for k, v in flags.items():
                self._pending[k] = self._pending.get(k, 0) + v
            self._pending["any"] = self._pending.get("any", 0) + found_inf
            self._pending["run"] = (self._pending.get("run", 0) + found_inf) * found_inf  # consecutive, on device
        opt.zero_grad(set_to_none=True)

    def _poison(self, module, params: list[Tensor]) -> None:
        """16-mixed: GradScaler decides whether to step from the gradients alone (it replaces a fused optimizer's
        `found_inf` with its own), so a non-finite loss term on any rank becomes a non-finite gradient before it
        looks, on the device; the scaler then skips the step on every rank and lowers its scale."""
        if not self._bad or not params:
            return
        bad = torch.stack(list(self._bad.values())).any().float()
        if module.trainer.world_size > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        params[0].grad.add_(torch.where(bad > 0, float("nan"), 0.0).to(params[0].grad.dtype))

    def flush(self, module) -> None:
        """On a logging iteration: the latest update's values and the updates skipped since the last flush (with
        check="logging" read on the host here, and NonFiniteError per the policy). Nothing if no update ran since."""
        if not self._latest:
            return
        for k, v in self._latest.items():
            module.log(k, v, on_step=True, prog_bar=self.policy.check == "update" and "/loss_" in k)
        self._latest = {}
        if self._pending:
            self.report(module, self._where)
        else:
            module.log(f"{self.name}/skipped", float(self._skipped), on_step=True)
            self._skipped = 0

    def report(self, module, where: str, log: bool = True) -> None:
        """check="logging": the skips since the last report, read on the host; NonFiniteError per the policy."""
        if not self._pending:
            return
        counts = dict(zip(self._pending, torch.stack([v.float() for v in self._pending.values()]).tolist()))
        self._pending = {}
        skipped, run = int(counts.pop("any")), int(counts.pop("run"))
        if log:
            module.log(f"{self.name}/skipped", float(skipped), on_step=True)
        if not skipped:
            self.skips = 0
            return
        bad = [k for k, n in counts.items() if n] or ["loss or gradient on another rank"]
        where = f"{skipped} {self.name} update(s) up to the {where}"
        module.print(f"warning: non-finite {', '.join(bad)} in {where}; skipped on the device")
        self.skips = run
        self._skip(bad, where, count=False)

    def _skip(self, bad: list[str], where: str, count: bool = True) -> bool:
        """Whether to skip an update with the non-finite terms `bad`; NonFiniteError to stop."""
        if not bad:
            self.skips = 0
            return False
        msg = f"non-finite {', '.join(bad)} in the {where}"
        if self.policy.action == "stop":
            raise NonFiniteError(msg)
        if not all_finite(p for group in self._optimizer.param_groups for p in group["params"]):
            raise NonFiniteError(f"{msg}: the {self.name}'s weights are non-finite, skipping cannot recover")
        self.skips += count
        if self.skips >= self.policy.max_consecutive:
            raise NonFiniteError(f"{msg}: {self.skips} consecutive updates skipped (nonfinite.max_consecutive); "
                                 "lower the learning rates or check the data")
        return True
