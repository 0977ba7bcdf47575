"""The `dmd` command: Lightning's CLI (fit / validate / test / predict) plus the project's subcommands."""

from __future__ import annotations

import sys

from lightning import LightningDataModule, LightningModule, Trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI


class DMDTrainer(Trainer):
    """Lightning's Trainer; the project's extra subcommands are its methods."""

    def pairs(self, model: LightningModule, datamodule: LightningDataModule, ckpt_path: str | None = None) -> None:
        """Generate noise-image regression pairs with the teacher's deterministic sampler.

        Needs a dmd_lightning.pairs.PairGenerator model and a PairGenerationDataModule; shards already in
        the datamodule's `out_dir` are skipped.
        """
        from .pairs import PairWriter

        others = [c for c in self.callbacks if not isinstance(c, PairWriter)]
        self.callbacks = others + [PairWriter(datamodule.out_dir, dtype=datamodule.dtype)]
        self.predict(model, datamodule=datamodule, ckpt_path=ckpt_path, return_predictions=False)

    def export(self, model: LightningModule, datamodule: LightningDataModule | None = None,
               ckpt_path: str | None = None, out_dir: str = "runs/export", ema: bool = True,
               teacher_path: str | None = None, dtype: str = "float32") -> None:
        """Write the (EMA) one-step generator of a DMDModule as a diffusers StableDiffusionPipeline folder.

        Loads the weights of `ckpt_path` (a `dmd fit` checkpoint) into the configured model; the VAE, text
        encoder and tokenizer come from the teacher's folder (or `teacher_path`). The pipeline takes exactly one
        step: `pipe(prompt, num_inference_steps=1, guidance_scale=1.0)`. dtype: float32, float16 or bfloat16.
        """
        import torch

        from .export import export_module

        if ckpt_path is not None:
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            model.load_state_dict(model.fill_frozen(checkpoint["state_dict"]))
        out = export_module(model, out_dir, ema=ema, teacher_path=teacher_path, dtype=dtype)
        print(f"exported the {'EMA ' if ema else ''}generator to {out}")


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


def cli(args=None, run: bool = True) -> DMDCLI:
    return DMDCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_class=DMDTrainer,
        parser_class=OneLineErrorParser,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main() -> None:
    """`dmd`: the project's own errors (bad input, missing weights or data, non-finite training) and Lightning's
    configuration errors (e.g. a GPU asked for where none exists) end with one line `error: ...`, exit code 2."""
    from .fmnist import DataNotFoundError
    from .loading import WeightsNotFoundError
    from .module import NonFiniteError, ShapeMismatchError
    from .pair_data import PairsError

    own = (PairsError, WeightsNotFoundError, DataNotFoundError, ShapeMismatchError, NonFiniteError,
           MisconfigurationException)
    try:
        cli()
    except Exception as err:
        cause = err  # jsonargparse wraps errors raised while it instantiates the config's classes
        while cause is not None and not isinstance(cause, own):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
