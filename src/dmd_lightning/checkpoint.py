"""Lightning's ModelCheckpoint, with `last.ckpt` written when training ends as well.

Lightning's own writes `last.ckpt` only with the periodic saves (`every_n_train_steps`): a run whose
max_steps or max_time falls between two saves ends with a `last.ckpt` that lacks its final steps. DMD's
training data is an endless stream, so no epoch end comes to the rescue.

Lightning also warns, at every periodic save of a manually optimized module, that the checkpoint holds the
state after the optimizer step, and prints a code example of saving a `layer` before it. For DMD that is
the state to keep: weights, optimizer states, EMA and update phase all after the same step, which is where a
resumed run continues. This class leaves that warning out.
"""

from __future__ import annotations

import warnings

from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

_POST_STEP_WARNING = "Using ModelCheckpoint with manual optimization and every_n_train_steps"


class ModelCheckpoint(LightningModelCheckpoint):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_POST_STEP_WARNING)
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
