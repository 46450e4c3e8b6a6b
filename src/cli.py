"""`python -m src.cli fit|validate|test|predict --config ...`: Lightning's CLI over the kit.

omegaconf parser mode lets recipes interpolate (`${model.init_args...}`); jsonargparse
checks every key against the classes' signatures, so a misspelt key stops the run at
once with its name instead of being silently ignored.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LightningCLI

from src.data.datamodule import LlavaDataModule
from src.training.module import LlavaLitModule


def main(args: list[str] | None = None) -> LightningCLI:
    torch.set_float32_matmul_precision("high")
    return LightningCLI(
        LlavaLitModule,
        LlavaDataModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
