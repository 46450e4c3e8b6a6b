"""`python -m src.launch.slurm`: the command line that writes and submits one run's batch job."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser, Namespace

from src.launch.parsing import dashed_flags
from src.launch.slurm.script import REQUEUE_ARGS, render, submit
from src.launch.slurm.settings import SETTING_NAMES, SlurmError, SlurmSettings, check_settings, settings_mapping
from src.launch.slurm.shape import shape_of, trainer_config


def build_parser() -> ArgumentParser:
    """jsonargparse, as the training CLI: the settings are `SlurmSettings`' own fields (typed, documented),
    beside the run's configs and the checks against the Trainer's shape. The dashed flags of earlier
    versions (`--cpus-per-task`, `--sbatch`, `--setup`) are translated by `main`."""
    parser = ArgumentParser(
        prog="python -m src.launch.slurm",
        description="Submit `python -m src.cli fit --config ...` as a SLURM batch job (docs/slurm.md). "
        "Arguments after `--` go to the training CLI (`-- --trainer.max_steps 100`). "
        "Flags take dashes or underscores (--cpus-per-task = --cpus_per_task).",
    )
    parser.add_argument("--config", action="append", required=True, help="training config (repeatable, as for src.cli)")
    parser.add_argument(
        "--slurm_config",
        type=str | None,
        help="YAML with the slurm settings (a `slurm:` section, or the settings alone)",
    )
    parser.add_argument(
        "--nodes", type=int | None, help="must equal trainer.num_nodes (taken from the config when left out)"
    )
    parser.add_argument("--ntasks_per_node", type=int | None, help="must equal trainer.devices (taken from the config)")
    parser.add_argument(
        "--gpus_per_node", type=int | None, help="default: trainer.devices for a gpu/cuda accelerator, else 0"
    )
    parser.add_class_arguments(SlurmSettings, None, skip={"nodes", "gpus_per_node"}, fail_untyped=True)
    parser.add_argument("--dry_run", action="store_true", help="print the script; submit nothing")
    parser.add_argument("--print_config", action="store_true", help="print the parsed settings as YAML and exit")
    # jsonargparse gives `--print_config` a meaning of its own (with a config-file argument): `parse` reads ours
    return parser


APPENDING = {"--sbatch": "--extra_sbatch+", "--setup": "--setup+"}
"""Repeatable flags that add a line to the settings file's list (as they always did)."""


def _translated(argv: list[str], parser: ArgumentParser) -> list[str]:
    out = []
    for arg in dashed_flags(argv, parser):
        flag, eq, value = arg.partition("=")
        out.append(APPENDING[flag] + eq + value if flag in APPENDING else arg)
    return out


def parse(argv: list[str]) -> tuple[Namespace, dict[str, Any]]:
    """The parsed flags over the settings file's values (the file's lists first, then the flags' lines),
    and the file's own values. Bad flags exit as the CLI's parser does (usage, one error line, code 2)."""
    parser = build_parser()
    argv = _translated(argv, parser)
    printing = "--print_config" in argv
    argv = [arg for arg in argv if arg != "--print_config"]
    args = parser.parse_args(argv)
    from_file: dict[str, Any] = {}
    if args.slurm_config is not None:
        raw, where = settings_mapping(args.slurm_config)
        from_file = check_settings(raw, where)
        parser.set_defaults(**from_file)
        args = parser.parse_args(argv)
    args.print_config = printing
    return args, from_file


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1 :]
    try:
        args, _ = parse(argv)
        if args.print_config:
            print(build_parser().dump(args, skip_none=False), end="")
            return 0
        fields = {name: args[name] for name in SETTING_NAMES if name not in ("nodes", "gpus_per_node")}
        trainer = trainer_config(args.config, [*overrides, *REQUEUE_ARGS])  # what the job's command line parses
        nodes, devices = shape_of(trainer)
        if args.nodes is not None and args.nodes != nodes:
            raise SlurmError(
                f"--nodes {args.nodes} but the config's trainer.num_nodes is {nodes}: they must be equal "
                f"(pass `-- --trainer.num_nodes {args.nodes}`, or leave --nodes out)"
            )
        if args.ntasks_per_node is not None and args.ntasks_per_node != devices:
            raise SlurmError(
                f"--ntasks-per-node {args.ntasks_per_node} but the config's trainer.devices is {devices}: they must "
                f"be equal, one rank per device (pass `-- --trainer.devices {args.ntasks_per_node}`)"
            )
        accelerator = trainer.get("accelerator")
        gpus = args.gpus_per_node
        if gpus is None:
            gpus = devices if accelerator in ("gpu", "cuda") else SlurmSettings.gpus_per_node
        elif accelerator in ("gpu", "cuda") and gpus < devices:
            raise SlurmError(f"--gpus-per-node {gpus} is fewer than trainer.devices {devices}")
        settings = SlurmSettings(nodes=nodes, gpus_per_node=gpus, **fields)
        run_dir = Path(trainer.get("default_root_dir") or os.getcwd()).absolute()
        cli_args = [a for path in args.config for a in ("--config", str(path))] + overrides
        script = render(settings, run_dir, cli_args, devices)
        if args.dry_run:
            print(script, end="")
            return 0
        job = submit(script, run_dir)
    except SlurmError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"submitted batch job {job}: {nodes} node(s) x {devices} task(s); log {run_dir}/slurm-{job}.out",
        file=sys.stderr,
    )
    print(job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
