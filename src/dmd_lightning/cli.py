"""The `dmd` command: Lightning's CLI (fit / validate / test / predict) plus the project's subcommands."""

from __future__ import annotations

from lightning import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI



class DMDTrainer(Trainer):
    """Lightning's Trainer; the project's extra subcommands are its methods."""


class DMDCLI(LightningCLI):
    """`dmd SUBCOMMAND --config CONFIG.yaml [--section.key value ...]`."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return LightningCLI.subcommands()


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
