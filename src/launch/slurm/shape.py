"""The Trainer's shape (nodes, devices per node) as the kit's own CLI parser resolves it from the
training config(s): the job's `--nodes` and `--ntasks-per-node`."""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from src.core.config_files import ConfigFileError, expand_config_args
from src.launch.slurm.settings import SlurmError


def _without_ckpt_path(overrides: Sequence[str]) -> list[str]:
    """Drops `--ckpt_path X` / `--ckpt_path=X`: the shape does not depend on it, and the CLI parser would
    read the checkpoint's hyperparameters."""
    kept, skip = [], False
    for arg in overrides:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            kept.append(arg)
    return kept


def trainer_config(config_paths: Sequence[str | os.PathLike], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The `trainer:` section as `python -m src.cli fit --config ... <overrides>` resolves it (the kit's
    LightningCLI parser, omegaconf mode, every key checked), without building the model or the Trainer.
    A config that does not parse is a `SlurmError` with the parser's message."""
    from lightning.pytorch.cli import LightningCLI

    from src.data.datamodule import LlavaDataModule
    from src.training.module import LlavaLitModule

    class Parsed(Exception):
        pass

    class ParseOnly(LightningCLI):
        def _set_seed(self) -> None:  # no side effects: this only reads the config
            pass

        def before_instantiate_classes(self) -> None:
            raise Parsed(self.config)

    if not config_paths:
        raise SlurmError("no training config: pass --config")
    args = ["fit"]
    for path in config_paths:
        if not Path(path).is_file():
            raise SlurmError(f"training config {path} does not exist")
        args += ["--config", str(path)]
    args += _without_ckpt_path([str(a) for a in overrides])
    try:  # a config's `base:` expanded as src.cli expands it (the job's own command runs src.cli)
        args = expand_config_args(args)
    except ConfigFileError as error:
        raise SlurmError(str(error)) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ParseOnly(
                LlavaLitModule,
                LlavaDataModule,
                parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
                args=args,
            )
        except Parsed as parsed:
            config = parsed.args[0]
        except SystemExit as exit_:  # the parser has printed why
            raise SlurmError(f"the training config does not parse (exit code {exit_.code}; see above)") from None
        except argparse.ArgumentError as error:  # what jsonargparse raises with exit_on_error=False
            raise SlurmError(f"the training config does not parse: {error}") from None
    trainer = config["fit"]["trainer"]
    return trainer.as_dict() if hasattr(trainer, "as_dict") else dict(trainer)


def _count_devices(devices: Any, accelerator: Any) -> int:
    accelerator = accelerator if isinstance(accelerator, str) else "a custom accelerator"
    if isinstance(devices, bool):
        devices = None
    if isinstance(devices, int) and devices >= 1:
        return devices
    if isinstance(devices, (list, tuple)) and devices:
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if text.isdigit() and int(text) >= 1:
            return int(text)
        ids = [p for p in text.split(",") if p.strip()]
        if "," in text and ids and all(p.strip().isdigit() for p in ids):
            return len(ids)
        if text == "auto" and accelerator == "cpu":
            return 1
    raise SlurmError(
        f"trainer.devices is {devices!r} (accelerator {accelerator}): SLURM needs the number of ranks per node "
        "before the job starts; set it, e.g. `-- --trainer.devices 8` (the GPUs per node)"
    )


def trainer_shape(config_paths: Sequence[str | os.PathLike], overrides: Sequence[str] = ()) -> tuple[int, int]:
    """(num_nodes, devices) as `python -m src.cli fit` resolves them from the config(s) and the command-line
    overrides (`["--trainer.devices=4"]`): the job's `--nodes` and `--ntasks-per-node`. `devices` is a
    count (`4`, `"4"`, `[0, 1]`, `"0,1"`; `"auto"` on a CPU is 1); `"auto"` / `-1` elsewhere is a
    `SlurmError`, since SLURM needs the number before the job starts."""
    return shape_of(trainer_config(config_paths, overrides))


def shape_of(trainer: Mapping[str, Any]) -> tuple[int, int]:
    nodes = trainer.get("num_nodes", 1)
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise SlurmError(f"trainer.num_nodes must be an integer >= 1, not {nodes!r}")
    return nodes, _count_devices(trainer.get("devices", "auto"), trainer.get("accelerator", "auto"))
