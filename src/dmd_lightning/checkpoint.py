"""Lightning's ModelCheckpoint, with `last.ckpt` written when training ends as well.

Lightning's own writes `last.ckpt` only with the periodic saves (`every_n_train_steps`): a run whose
max_steps or max_time falls between two saves ends with a `last.ckpt` that lacks its final steps. DMD's
training data is an endless stream, so no epoch end comes to the rescue.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint


class ModelCheckpoint(LightningModelCheckpoint):
    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
