"""What a batch job asks SLURM for (`SlurmSettings`), from a YAML `slurm:` section, a mapping or the
command line's flags, checked field by field."""

from __future__ import annotations

import dataclasses
import os
import re
from argparse import ArgumentError
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser

from src.launch.parsing import one_line


class SlurmError(ValueError):
    """A setting, a config or a submission that cannot work; the message says what to change."""


@dataclass
class SlurmSettings:
    """What the batch job asks SLURM for, and how its shell is prepared. Every field can be set in a
    YAML `slurm:` section (`load_settings`) or by the flag of the same name (`--gpus-per-node` ...).

    Args:
        nodes: `#SBATCH --nodes`; must equal the Trainer's `num_nodes` (the CLI takes it from the config).
        gpus_per_node: `--gpus-per-node` (0: none asked; the CLI uses `trainer.devices` for a `gpu` /
            `cuda` accelerator when it is not set).
        cpus_per_task: `--cpus-per-task`, per rank (data-loader workers and the rank itself); also given
            to `srun`, which does not inherit it in every SLURM version.
        mem: `--mem` per node (`"480G"`; None: the partition's default).
        partition: the job's partition (None: the cluster's default).
        account: the account charged (None: the user's default).
        qos: the quality of service (None: the partition's default).
        time: `--time` (`"24:00:00"`, `"2-00:00:00"`, `"90"` minutes). Quote it in YAML: YAML 1.1 readers
            other than `load_settings` turn an unquoted 24:00:00 into the number 86400.
        job_name: `--job-name`.
        extra_sbatch: more directives, in order: `"--exclusive"`, `"constraint=a100"` or
            `"#SBATCH --reservation=x"` (each becomes one `#SBATCH` line).
        setup: shell lines run, in order, before `srun` (`module load cuda/12.4`,
            `source /path/.venv/bin/activate`, `export NCCL_DEBUG=WARN`); the script stops if one fails.
        signal_seconds: SIGUSR1 comes this many seconds before the time limit: the time a rank has to
            finish its step and write the checkpoint (`--signal=SIGUSR1@90`).
        python: the interpreter `srun` starts (`python` from the environment `setup` prepares, or a path).
    """

    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 4
    mem: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "24:00:00"
    job_name: str = "llava"
    extra_sbatch: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    signal_seconds: int = 90
    python: str = "python"

    def __post_init__(self) -> None:
        for name, least in (("nodes", 1), ("gpus_per_node", 0), ("cpus_per_task", 1), ("signal_seconds", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise SlurmError(f"slurm setting {name} must be an integer >= {least}, not {value!r}")
        for name in ("mem", "partition", "account", "qos"):
            value = getattr(self, name)
            if value is not None:
                _check_word(name, value)
        if not isinstance(self.time, str):
            raise SlurmError(
                f"slurm setting time must be a string such as '24:00:00' or '2-00:00:00', not {self.time!r} "
                "(in YAML, quote it: an unquoted 24:00:00 can be read as the number 86400)"
            )
        for name in ("time", "job_name", "python"):
            _check_word(name, getattr(self, name))
        for name in ("extra_sbatch", "setup"):
            lines = getattr(self, name)
            if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
                raise SlurmError(f"slurm setting {name} must be a list of strings (one line each), not {lines!r}")
            for line in lines:
                if "\n" in line or "\r" in line or not line.strip():
                    raise SlurmError(f"slurm setting {name}: each entry is one non-empty line, not {line!r}")


def _check_word(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise SlurmError(f"slurm setting {name} must be a non-empty string without spaces, not {value!r}")


SETTING_NAMES = tuple(f.name for f in dataclasses.fields(SlurmSettings))


class _Loader(yaml.SafeLoader):
    """YAML without YAML 1.1's base-60 numbers: `time: 24:00:00` stays the string it looks like."""


_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(0|[1-9][0-9_]*)$"), list("-+0123456789"))


def settings_mapping(source: str | os.PathLike | Mapping | None) -> tuple[dict, str]:
    """The settings' mapping from a file or a mapping (its `slurm:` section when it has one), and where
    it came from (for messages)."""
    if source is None:
        return {}, "defaults"
    if isinstance(source, Mapping):
        raw, where = dict(source), "the slurm settings"
    else:
        path = Path(source)
        if not path.is_file():
            raise SlurmError(f"slurm settings file {path} does not exist")
        raw, where = yaml.load(path.read_text(), Loader=_Loader), str(path)
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise SlurmError(f"{where}: expected a mapping of slurm settings, found {type(raw).__name__}")
        raw = dict(raw)
    if "slurm" in raw:
        section = raw["slurm"]
        if section is None:
            section = {}
        if not isinstance(section, Mapping):
            raise SlurmError(f"{where}: the slurm: section must be a mapping, found {type(section).__name__}")
        raw, where = dict(section), f"{where} (slurm:)"
    return raw, where


def settings_parser() -> ArgumentParser:
    """jsonargparse's parser of `SlurmSettings`: the fields, their types and documented defaults."""
    parser = ArgumentParser(prog="slurm settings", exit_on_error=False)
    parser.add_class_arguments(SlurmSettings, None, fail_untyped=True)
    return parser


def lenient(raw: Mapping) -> dict[str, Any]:
    """The shorthands a settings file may use: `extra_sbatch` / `setup` as one string (one line) or
    null, `mem` as a number (MB)."""
    values = dict(raw)
    for name in ("extra_sbatch", "setup"):
        if isinstance(values.get(name), str):
            values[name] = [values[name]]
        elif values.get(name) is None and name in values:
            values[name] = []
    if isinstance(values.get("mem"), int) and not isinstance(values.get("mem"), bool):
        values["mem"] = str(values["mem"])
    return values


def check_settings(raw: Mapping, where: str) -> dict[str, Any]:
    """The settings `raw` holds, checked by jsonargparse (unknown keys, types) and returned as they parse;
    a `SlurmError` of one line naming the key otherwise."""
    values = lenient(raw)
    try:
        namespace = settings_parser().parse_object(values)
    except ArgumentError as error:
        message = f"{where}: {one_line(error)}"
        unknown = sorted(str(k) for k in values if k not in SETTING_NAMES)
        if unknown:
            message += f"; valid: {', '.join(SETTING_NAMES)}"
        if isinstance(values.get("time"), (int, float)) and not isinstance(values.get("time"), bool):
            message += " (time: quote it in YAML, an unquoted 24:00:00 can be read as the number 86400)"
        raise SlurmError(message) from None
    return {name: namespace[name] for name in values}


def load_settings(source: str | os.PathLike | Mapping | SlurmSettings | None) -> SlurmSettings:
    """`SlurmSettings` from a YAML file or a mapping: its `slurm:` section if it has one, else the whole
    mapping (`None`: the defaults). Parsed by jsonargparse as the CLI parses its configs: an unknown key or
    a wrong type is a one-line error naming it; `extra_sbatch` / `setup` may be one string (one line),
    `mem` a number (MB)."""
    if isinstance(source, SlurmSettings):
        return source
    raw, where = settings_mapping(source)
    values = check_settings(raw, where)
    try:
        return SlurmSettings(**values)
    except SlurmError as error:
        raise SlurmError(f"{where}: {error}") from None
