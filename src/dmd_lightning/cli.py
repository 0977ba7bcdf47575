"""The `dmd` command: Lightning's CLI (fit / validate / test / predict) plus the project's subcommands."""

from __future__ import annotations

from lightning import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI


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


class DMDCLI(LightningCLI):
    """`dmd SUBCOMMAND --config CONFIG.yaml [--section.key value ...]`."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "pairs": {"model", "datamodule"}}


def cli(args=None, run: bool = True) -> DMDCLI:
    return DMDCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_class=DMDTrainer,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
