"""The `dmd` command: Lightning's CLI (fit / validate / test / predict) plus the project's subcommands.

`--ckpt_path last` means the newest `last.ckpt` of the config's run, wherever its version folder is
(checkpoint.find_last_checkpoint); `dmd fit` without one starts from scratch and says so. `dmd validate`, `test`,
`predict` and `export` without `--ckpt_path` warn in one line that they use the untrained generator (not `dmd predict`
of an exported folder, configs/exported.yaml, whose weights are the folder's).
"""

from __future__ import annotations

import os
import sys

from lightning import LightningDataModule, LightningModule, Trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Timer as LightningTimer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dmd_lightning.checkpoint import CheckpointIO, Stopped, find_last_checkpoint, load_checkpoint_file
from dmd_lightning.errors import CheckpointError, ConfigError, DataNotFoundError, NonFiniteError
from dmd_lightning.perf import Timer
from dmd_lightning.quiet import quiet
from dmd_lightning.state import upgrade_hparams


class DMDTrainer(Trainer):
    """Lightning's Trainer; the project's extra subcommands are its methods."""

    def pairs(self, model: LightningModule, datamodule: LightningDataModule, ckpt_path: str | None = None) -> None:
        """Generate noise-image regression pairs with the teacher's deterministic sampler.

        Needs a dmd_lightning.data.generation.PairGenerator model and a PairGenerationDataModule; shards already in
        the datamodule's `out_dir` are skipped.
        """
        from dmd_lightning.data.generation import PairWriter

        others = [c for c in self.callbacks if not isinstance(c, PairWriter)]
        self.callbacks = others + [PairWriter(datamodule.out_dir, dtype=datamodule.dtype)]
        self.predict(model, datamodule=datamodule, ckpt_path=ckpt_path, return_predictions=False)

    def export(self, model: LightningModule, datamodule: LightningDataModule | None = None,
               ckpt_path: str | None = None, out_dir: str = "runs/export", ema: bool = True,
               teacher_path: str | None = None, dtype: str = "float32") -> None:
        """Write the (EMA) generator of a DMDModule as a diffusers pipeline folder, by model kind.

        Loads the weights of `ckpt_path` (a `dmd fit` checkpoint) into the configured model. A pixel-space UNet2DModel
        generator becomes a ConsistencyModelPipeline: `DiffusionPipeline.from_pretrained(out_dir)(batch_size=4,
        class_labels=[...], ...)`, the exact call in the folder's README; a Stable Diffusion one a
        StableDiffusionPipeline with the teacher's VAE, text encoder and tokenizer (from its folder or
        `teacher_path`). ema=False: the raw generator. dtype: float32, float16 or bfloat16.
        """
        from dmd_lightning.export import export_module

        if ckpt_path is not None:
            checkpoint = self.strategy.checkpoint_io.load_checkpoint(ckpt_path)
            model.on_load_checkpoint(checkpoint)
            model.load_state_dict(checkpoint["state_dict"])
        out = export_module(model, out_dir, ema=ema, teacher_path=teacher_path, dtype=dtype)
        print(f"exported the {'EMA ' if ema else ''}generator to {out} (usage: {out / 'README.md'})")

    def validate(self, model: LightningModule | None = None, dataloaders=None, ckpt_path: str | None = None,
                 verbose: bool = False, datamodule: LightningDataModule | None = None, **kwargs):
        """Score the (EMA) generator on the validation set; `dmd validate` prints one table (metric, value, samples,
        NFE, s/image) and writes it as JSON beside the checkpoint (metrics.report); verbose: Lightning's too."""
        return super().validate(model, dataloaders, ckpt_path, verbose, datamodule, **kwargs)


class OneLineErrorParser(LightningArgumentParser):
    """A config error is one line on stderr (the offending key and why), not usage text and a nested report."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        lines = [line.strip(" -") for line in str(message).splitlines() if line.strip(" -")]
        why = [line for line in lines[1:] if any(w in line for w in ("not accepted", "No action", "nrecognized",
                                                                    "not a valid", "does not exist", "Expected"))]
        summary = lines[0].rstrip(":") + (f": {why[0]}" if why else "")
        sys.stderr.write(f"error: {summary} (options: {self.prog.replace(' [options]', '')} --help)\n")
        self.exit(2)


class DMDCLI(LightningCLI):
    """`dmd SUBCOMMAND --config CONFIG.yaml [--section.key value ...]`."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "pairs": {"model", "datamodule"},
                "export": {"model", "datamodule"}}

    def instantiate_classes(self) -> None:
        """Lightning's, then `--ckpt_path last` resolved, now that the trainer says where the config's runs are: the
        checkpoint's settings replace the config's as for an explicit path (Lightning reads them before anything is
        built, when `last` names no file yet), and the classes are built again if they differ."""
        super().instantiate_classes()
        subcommand = self.config.get("subcommand")
        if not subcommand or self.config[subcommand].get("ckpt_path") != "last":
            return
        path = find_last_checkpoint(self.trainer)
        if path is not None and self._parse_ckpt_path(path):
            vars(self).pop("config_dump", None)  # Lightning's cached dump gives the module its hparams: the new ones
            super().instantiate_classes()

    def _parse_ckpt_path(self, path: str | None = None) -> bool:
        """Lightning's CLI reads a checkpoint's hyper-parameters into the config, so that a resumed run or an
        evaluation uses the settings it was trained with; here the file is read safely first (CheckpointError
        naming it otherwise) and only the keys the configured model takes are copied. An override of Lightning's
        private method, kept on purpose: Lightning's own reads the whole checkpoint into memory for its
        hyper-parameters (tens of GB at SD1.5 scale), this one memory-maps a file and reads a sharded folder's
        skeleton alone. Whether a setting changed."""
        subcommand = self.config.get("subcommand")
        path = path or (self.config[subcommand].get("ckpt_path") if subcommand else None)
        if not path or not os.path.exists(path):  # a file, or a ShardedCheckpointIO folder
            return False
        init_args = self.config[subcommand].get("model", {}).get("init_args")
        if init_args is None:
            return False
        hparams = upgrade_hparams(load_checkpoint_file(path, tensors=False).get("hyper_parameters") or {}, init_args)
        changed = False
        for key, value in hparams.items():
            if key in init_args and not key.startswith("_"):
                changed |= _plain(init_args[key]) != _plain(value)
                init_args[key] = value
        return changed

    def instantiate_trainer(self, **kwargs) -> Trainer:
        section = self.config_init[self.subcommand] if self.subcommand else self.config_init  # run=False: unkeyed
        config = {**(section.get("trainer") or {}), **kwargs}
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if config.get("max_time") is not None and not any(isinstance(cb, LightningTimer) for cb in callbacks):
            # the Timer max_time makes agrees across ranks at every batch: perf.Timer does so on logging steps
            kwargs.update(max_time=None, callbacks=[*callbacks, Timer(duration=config["max_time"])])
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # no plugin chosen: write beside, rename
            trainer.strategy.checkpoint_io = CheckpointIO()
        return trainer

    def resolve_ckpt_path(self) -> None:
        """`last` -> the run's newest last.ckpt; a path that does not exist is refused before anything loads."""
        kwargs = self.config_init[self.subcommand]
        path = kwargs.get("ckpt_path")
        training = self.subcommand == "fit"
        if path == "last":
            path = find_last_checkpoint(self.trainer)
            if path is None and not training:
                raise CheckpointError(f"--ckpt_path last: no last.ckpt of this config's runs (under "
                                      f"{self.trainer.default_root_dir}); pass a checkpoint path")
            print(f"resuming from {path}" if path else "--ckpt_path last: no earlier checkpoint of this config; "
                  "starting from scratch", file=sys.stderr)
            kwargs["ckpt_path"] = path
        elif path is not None and "://" not in str(path) and not os.path.exists(path):
            raise CheckpointError(f"--ckpt_path {path}: no such file or folder")
        elif path is None and not training and self.subcommand != "pairs" and self.model_needs_checkpoint:
            print(f"warning: `dmd {self.subcommand}` without --ckpt_path uses the untrained generator (the teacher's "
                  "copy); pass --ckpt_path PATH or --ckpt_path last", file=sys.stderr)

    @property
    def model_needs_checkpoint(self) -> bool:
        """False for a model whose weights come from elsewhere (export.pretrained.ExportedGenerator)."""
        return getattr(self.model, "needs_checkpoint", True)

    before_fit = before_test = before_predict = resolve_ckpt_path

    def before_validate(self) -> None:
        from dmd_lightning.metrics.report import ValidationReport

        self.resolve_ckpt_path()
        self.trainer.callbacks.append(ValidationReport())

    def before_export(self) -> None:
        from dmd_lightning.export import generator_unet

        generator_unet(getattr(self.model, "generator_ema", None))  # a model that cannot be exported is refused first
        self.resolve_ckpt_path()


def _plain(value):
    """A config value as plain data, to compare: namespaces as dicts, tuples as lists."""
    value = value.as_dict() if hasattr(value, "as_dict") else value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def cli(args=None, run: bool = True) -> DMDCLI:
    """The `dmd` command with `args` (a list, as on the command line), or with sys.argv when None. With `args` the
    calling script's own sys.argv is hidden from Lightning, which would otherwise warn about both."""
    quiet()
    argv, sys.argv = sys.argv, (sys.argv[:1] if args is not None else sys.argv)
    try:
        return DMDCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      trainer_class=DMDTrainer, parser_class=OneLineErrorParser,
                      save_config_kwargs={"overwrite": True}, args=args, run=run)
    finally:
        sys.argv = argv


def main(args: list[str] | None = None) -> None:
    """`dmd`: the project's own errors (bad settings, missing or foreign checkpoints, weights or data, non-finite
    training), files that cannot be read or written, and Lightning's configuration errors (e.g. a GPU asked for
    where none exists) end with one line `error: ...`, exit code 2. A stop on SIGTERM / SIGINT, after saving
    `last.ckpt`, ends with one line and exit code 128 + the signal's number, so that schedulers requeue the job."""
    from dmd_lightning.data.format import PairsError
    from dmd_lightning.loading import WeightsNotFoundError

    own = (ConfigError, PairsError, WeightsNotFoundError, DataNotFoundError, NonFiniteError,
           MisconfigurationException, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
    try:
        cli(args)
    except Exception as err:
        cause = err  # jsonargparse wraps errors raised while it instantiates the config's classes
        while cause is not None and not isinstance(cause, own + (Stopped,)):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        if isinstance(cause, Stopped):
            print(cause, file=sys.stderr)
            raise SystemExit(128 + cause.signum) from None
        print(f"error: {one_line(cause)}", file=sys.stderr)
        raise SystemExit(2) from None


def one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.strerror}: {err.filename!r}"
    return " ".join(str(err).split())


if __name__ == "__main__":
    main()
