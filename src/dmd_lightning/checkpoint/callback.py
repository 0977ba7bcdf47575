"""When checkpoints are written and which one `--ckpt_path last` resumes.

`ModelCheckpoint` is Lightning's, with `last.ckpt` written when training ends as well. Lightning's own writes
`last.ckpt` only with the periodic saves (`every_n_train_steps`): a run whose max_steps or max_time falls between
two saves ends with a `last.ckpt` that lacks its final steps. DMD's training data is an endless stream, so no
epoch end comes to the rescue.

Lightning also warns, at every periodic save of a manually optimized module, that the checkpoint holds the
state after the optimizer step, and prints a code example of saving a `layer` before it. For DMD that is
the state to keep: weights, optimizer states, EMA and update phase all after the same step, which is where a
resumed run continues. This class leaves that warning out.

It also turns SIGTERM (what a cluster sends before pre-emption) and SIGINT (Ctrl-C) into a resumable stop: the
signal is noted, `last.ckpt` is written at the end of the training step in progress (under DDP, where the ranks
agree on it every `log_every_n_steps` batches, within that many; during a validation, when that validation ends),
and `Stopped` is raised, which `dmd` reports in one line with exit code 128 + the signal's number, so that a
scheduler requeues the job. A second Ctrl-C interrupts at once. With gradient accumulation both this stop and any
other asked inside an update (max_time, another callback) wait for the update's last micro-batch: accumulated
gradients are not in checkpoints, so only an update boundary resumes exactly. For the same reason no checkpoint is
saved inside an update (a timed save waits for its end; one at an epoch's end is left out with a warning), and
`val_check_interval` must be a multiple of `optim.accumulate`.

`find_last_checkpoint` is what `dmd fit --ckpt_path last` resumes: the newest `last.ckpt` of the run's
checkpoint folder, its logger's `version_*` folders or its `default_root_dir`, not only of the new version's
folder that Lightning looks in.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import warnings

from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from dmd_lightning.errors import ConfigError
from dmd_lightning.perf import sync_every

_POST_STEP_WARNING = "Using ModelCheckpoint with manual optimization and every_n_train_steps"


class Stopped(Exception):
    """Training stopped on a signal after saving a resumable checkpoint."""

    def __init__(self, signum: int, path: str | None, global_step: int):
        self.signum, self.path, self.global_step = signum, path, global_step
        super().__init__(f"stopped by {signal.Signals(signum).name} at global step {global_step}; "
                         + (f"saved {path}; resume with --ckpt_path last" if path else "nothing saved"))


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's, plus `last.ckpt` at the end of training and a saved stop on SIGTERM / SIGINT (module
    docstring); `stop_on_signal=False` leaves the signals to Lightning."""

    def __init__(self, *args, stop_on_signal: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_on_signal = stop_on_signal
        self.signum: int | None = None  # the signal received
        self._stopping: Stopped | None = None  # raised at the next hook once last.ckpt is saved
        self._handlers: dict = {}
        self._saved_step: int | None = None  # global step of the newest checkpoint this run wrote
        self._stop_at_update = False  # a stop asked inside an accumulated update, held until its end
        self._agreed = False  # whether the ranks agreed that a signal came

    def on_fit_start(self, trainer, pl_module) -> None:
        self.signum, self._stopping, self._saved_step, self._stop_at_update = None, None, None, False
        self._agreed = False

    def on_train_start(self, trainer, pl_module) -> None:
        check_validation_at_updates(trainer, pl_module)
        # here, after Lightning installs its own SIGTERM handler (which would end the run at once, before an
        # accumulating module reaches its update boundary), so that the signals are this callback's alone
        if self.stop_on_signal and threading.current_thread() is threading.main_thread():
            self._handlers = {s: signal.signal(s, self._notice) for s in (signal.SIGTERM, signal.SIGINT)}

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restore_handlers()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for s, handler in self._handlers.items():
            signal.signal(s, handler)
        self._handlers = {}

    def _notice(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now, unsaved
            self._restore_handlers()
            raise KeyboardInterrupt
        self.signum = signum
        print(f"{signal.Signals(signum).name} received: saving a checkpoint when this step (or validation) ends, "
              "then stopping", file=sys.stderr, flush=True)

    def _save_if_signalled(self, trainer, batch_idx: int | None = None) -> None:
        """Saves last.ckpt if a signal came; `Stopped` is raised at the next hook (after this step's logs).

        Every rank must stop at the same step, and the signal may have reached only some of them: the ranks agree by
        a collective, which waits for the device. Under DDP it runs every `log_every_n_steps` training batches (and
        at each validation's end), not at every batch."""
        if self._stopping is not None:
            return
        if not self._agreed:
            if trainer.world_size > 1 and batch_idx is not None and batch_idx % sync_every(trainer):
                return
            self._agreed = trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False)
            if not self._agreed:
                return
        if getattr(trainer.lightning_module, "mid_update", False):  # gradients of unfinished accumulation: later
            return
        path = self._save_last(trainer)
        self._stopping = Stopped(self.signum or signal.SIGTERM, path, trainer.global_step)

    def _stop_if_saved(self) -> None:
        if self._stopping is not None:
            raise self._stopping

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._stop_if_saved()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._stop_if_saved()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_POST_STEP_WARNING)
            # not inside an update: e.g. a resumed run's first micro-batch, at the global step of the checkpoint it
            # resumed (Lightning forgets that it saved there), or a save every train_time_interval
            if not _inside_update(pl_module):
                super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._save_if_signalled(trainer, batch_idx)
        self._hold_stop_until_update_ends(trainer, pl_module)

    def _hold_stop_until_update_ends(self, trainer, pl_module) -> None:
        """Runs after the other callbacks' on_train_batch_end (Lightning orders checkpoint callbacks last), and so
        sees a stop that max_time's Timer or another callback asked for at this batch."""
        if getattr(pl_module, "mid_update", False):
            if trainer.should_stop:
                self._stop_at_update, trainer.should_stop = True, False
        elif self._stop_at_update:
            self._stop_at_update, trainer.should_stop = False, True

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not _inside_update(pl_module, "the epoch ended"):
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not _inside_update(pl_module, "validation ended"):
            super().on_validation_end(trainer, pl_module)
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._save_if_signalled(trainer)
            self._stop_if_saved()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._saved_step = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        # instead of Lightning's, which skips it after any periodic `last` save of this run; saved even at the
        # step of a periodic save, since callbacks' states (the teacher's wall time) change after it
        if self.save_last and not trainer.fast_dev_run and not _inside_update(pl_module, "training ended"):
            trainer.save_checkpoint(self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST))

    def _save_last(self, trainer) -> str:
        """`last.ckpt` at this step, unless a checkpoint of this step is already there."""
        path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)
        if self._saved_step != trainer.global_step or not os.path.lexists(path):
            trainer.save_checkpoint(path)
        return path


def _inside_update(pl_module, when: str | None = None) -> bool:
    """Whether an accumulated update is unfinished: its gradients are in no checkpoint, so none is saved then (with
    `when`, a warning says that none was)."""
    inside = getattr(pl_module, "mid_update", False)
    if inside and when:
        rank_zero_warn(f"{when} inside an accumulated update (optim.accumulate): no checkpoint saved there, since it "
                       "would not resume exactly; the newest one stays the last")
    return inside


def check_validation_at_updates(trainer, pl_module) -> None:
    """ConfigError when validation (and the checkpoints saved when it ends) would fall inside an update of
    `optim.accumulate` batches, whose accumulated gradients no checkpoint holds."""
    accumulate = getattr(getattr(pl_module, "optim", None), "accumulate", 1)
    every = getattr(trainer, "val_check_batch", None)
    if accumulate > 1 and isinstance(every, int) and trainer.limit_val_batches != 0 and every % accumulate:
        raise ConfigError(f"validation every {every} batches falls inside updates of optim.accumulate={accumulate} "
                          "batches, where no checkpoint resumes exactly; set trainer.val_check_interval to a "
                          f"multiple of {accumulate}")


_LAST = re.compile(r"^last(-v\d+)?\.ckpt$")


def _lost_lasts(folder) -> list[str]:
    """`.last.ckpt.old` folders in `folder` whose `last.ckpt` a crash mid-swap removed."""
    if not os.path.isdir(folder):
        return []
    olds = [n for n in os.listdir(folder) if n.startswith(".") and n.endswith(".old") and _LAST.match(n[1:-4])]
    return [os.path.join(folder, n) for n in olds if not os.path.lexists(os.path.join(folder, n[1:-4]))]


def find_last_checkpoint(trainer) -> str | None:
    """The newest `last.ckpt` (file or sharded folder) of this run's configuration, None if there is none: in
    the checkpoint callbacks' `dirpath`, else in the folders Lightning would choose, for every version of the
    run's logger (`<save_dir>/<name>/version_*/checkpoints`) or, without a logger, `<default_root_dir>/checkpoints`."""
    roots = [cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    if len(roots) < len(trainer.checkpoint_callbacks) or not roots:
        roots += [logger.root_dir for logger in trainer.loggers if getattr(logger, "root_dir", None)]
        roots += [] if trainer.loggers else [os.path.join(trainer.default_root_dir, "checkpoints")]
    found = set()
    for root in map(str, roots):
        for folder, dirs, _ in os.walk(root):
            dirs[:] = [d for d in dirs if not _LAST.match(d)]  # a sharded checkpoint is a folder: not walked into
            found |= {os.path.join(folder, n) for n in os.listdir(folder) if _LAST.match(n)}
            found |= set(_lost_lasts(folder))
    return max(found, key=os.path.getmtime, default=None)

