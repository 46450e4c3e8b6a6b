"""`python -m src.launch.slurm`: one training run as a SLURM batch job that checkpoints and requeues
itself before its time limit.

    python -m src.launch.slurm --config experiments/llava15_7b/stage1_align.yaml \\
        --slurm-config cluster.yaml --partition gpu --time 48:00:00 [--dry-run] [-- --trainer.max_steps 100]

From the training config(s) and a few settings (flags, or a `slurm:` section in YAML: `SlurmSettings`)
it writes an sbatch script whose `--nodes` / `--ntasks-per-node` are the Trainer's `num_nodes` /
`devices` (one task per device, as Lightning's SLURM environment requires), which runs
`srun python -m src.cli fit --config ...` and asks for `--signal=SIGUSR1@90`. Logs go to the run
folder (the Trainer's `default_root_dir`) as `slurm-<jobid>.out`; the script is kept there as
`job.sbatch`. `--dry-run` prints the script instead of submitting it; otherwise the job id is printed.

Time limits and preemption: SLURM sends SIGUSR1 `signal_seconds` before the limit. `SlurmRequeue`
(added to every run the script starts) notes it, and at the end of the next optimizer step, on every
rank at once, saves `hpc_ckpt_N.ckpt` in the run folder (Lightning's HPC checkpoint), runs `scontrol
requeue` and stops. The requeued job (same job id, same script) resumes with `--ckpt_path=last`, the
run's newest checkpoint that loads (that one, or a newer periodic one), weights, optimizer, counters
and the data stream's position (`LlavaDataModule.state_dict`) alike, and logs into the same
`version_<job id>` folder. A job requeued without the signal (node failure, preemption, `scontrol
requeue`: SIGTERM, on which `StopOnSignal` saves at the end of the step) resumes the same way; with no
checkpoint at all it fails with the places searched rather than starting over. See docs/slurm.md.

The API (used by `src.launch.sweep`): `SlurmSettings`, `load_settings`, `render`, `submit`,
`trainer_shape`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Callback

log = logging.getLogger(__name__)

ARRAY_TASK_ID = "${SLURM_ARRAY_TASK_ID}"
"""The one shell expansion `render` leaves in `cli_args`: an array task's index."""

REQUEUE_CALLBACK = "src.launch.slurm.SlurmRequeue"
REQUEUE_ARGS = [f"--trainer.callbacks+={REQUEUE_CALLBACK}"]
"""CLI args that add `SlurmRequeue` to a run (after every `--config`: a later config would replace the
callback list). `render` appends them to `src.cli fit`; a program of its own (`command=`) adds them itself."""

DEFAULT_COMMAND = ("-m", "src.cli", "fit")
HPC_CHECKPOINT = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


class SlurmError(ValueError):
    """A setting, a config or a submission that cannot work; the message says what to change."""


# ---- settings ------------------------------------------------------------------------------------


@dataclass
class SlurmSettings:
    """What the batch job asks SLURM for, and how its shell is prepared. Every field can be set in a
    YAML `slurm:` section (`load_settings`) or by the flag of the same name (`--gpus-per-node` ...).

    nodes: `#SBATCH --nodes`; must equal the Trainer's `num_nodes` (the CLI takes it from the config).
    gpus_per_node: `--gpus-per-node` (0: none asked; the CLI uses `trainer.devices` for a `gpu` /
        `cuda` accelerator when it is not set).
    cpus_per_task: `--cpus-per-task`, per rank (data-loader workers and the rank itself); also given
        to `srun`, which does not inherit it in every SLURM version.
    mem: `--mem` per node (`"480G"`; None: the partition's default).
    partition, account, qos: the job's partition, account and QOS (None: the cluster's defaults).
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


def _settings_mapping(source: str | os.PathLike | Mapping | None) -> tuple[dict, str]:
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


def load_settings(source: str | os.PathLike | Mapping | SlurmSettings | None) -> SlurmSettings:
    """`SlurmSettings` from a YAML file or a mapping: its `slurm:` section if it has one, else the whole
    mapping (`None`: the defaults). An unknown key is an error that names it and lists the valid ones;
    `extra_sbatch` / `setup` may be one string (one line), `mem` a number (MB)."""
    if isinstance(source, SlurmSettings):
        return source
    raw, where = _settings_mapping(source)
    unknown = sorted(str(k) for k in raw if k not in SETTING_NAMES)
    if unknown:
        raise SlurmError(f"{where}: unknown slurm setting(s) {', '.join(unknown)}; valid: {', '.join(SETTING_NAMES)}")
    values = dict(raw)
    for name in ("extra_sbatch", "setup"):
        if isinstance(values.get(name), str):
            values[name] = [values[name]]
        elif values.get(name) is None and name in values:
            values[name] = []
    if isinstance(values.get("mem"), int) and not isinstance(values.get("mem"), bool):
        values["mem"] = str(values["mem"])
    try:
        return SlurmSettings(**values)
    except SlurmError as error:
        raise SlurmError(f"{where}: {error}") from None


# ---- the script ----------------------------------------------------------------------------------


def _sbatch_line(line: str) -> str:
    """`--exclusive`, `exclusive`, `#SBATCH --exclusive` -> `#SBATCH --exclusive`."""
    text = line.strip()
    if text.startswith("#SBATCH"):
        text = text[len("#SBATCH") :].strip()
    if not text.startswith("-"):
        text = "--" + text
    return f"#SBATCH {text}"


def _sbatch_path(path: Path) -> str:
    """A path in an `#SBATCH` line: `%` is SLURM's filename pattern character, spaces need quotes."""
    text = str(path).replace("%", "%%")
    return f'"{text}"' if any(c.isspace() for c in text) else text


def _shell_arg(arg: str) -> str:
    """One argument, quoted for bash, except the literal `${SLURM_ARRAY_TASK_ID}`, which the shell expands."""
    parts = str(arg).split(ARRAY_TASK_ID)
    return f'"{ARRAY_TASK_ID}"'.join(shlex.quote(part) if part else "" for part in parts) or "''"


def render(
    settings: SlurmSettings,
    run_dir: str | os.PathLike,
    cli_args: Sequence[str],
    ntasks_per_node: int,
    array: str | None = None,
    *,
    command: Sequence[str] | None = None,
) -> str:
    """The sbatch script's text.

    settings: what to ask for (`settings.nodes` must already equal the Trainer's `num_nodes`).
    run_dir: the run folder (the Trainer's `default_root_dir`): logs go there as `slurm-%j.out`
        (`slurm-%A_%a.out` for an array), and a requeued job looks there for `hpc_ckpt_*.ckpt`.
    cli_args: the arguments after `python -m src.cli fit` (`["--config", "x.yaml", "--trainer.max_steps=9"]`);
        each is quoted for the shell, except the literal `${SLURM_ARRAY_TASK_ID}`, which is expanded.
    ntasks_per_node: `--ntasks-per-node`, the Trainer's `devices` (one rank per device).
    array: `--array` (`"0-7%4"`, `"0,3,5"`): the script is a job array, one task per index.
    command: the program `srun {python}` starts instead of `-m src.cli fit` (e.g. `["-m", "src.launch.sweep",
        "run-one"]`); such a program adds `REQUEUE_ARGS` to its own runs.

    The script asks for `--signal=SIGUSR1@{signal_seconds}`, `--requeue` and `--open-mode=append` (a
    requeued job's output follows the first one's in the same file), sets the working directory to
    the current one, runs `setup` in order, prints a header line per start (job id, restart count),
    then `srun`. For `src.cli fit`, `SlurmRequeue` is added to the run, and a requeued job (restart
    count > 0) resumes with `--ckpt_path=last`: the run's newest checkpoint that loads, whether the one
    written on the signal (`hpc_ckpt_N.ckpt`), a periodic one or one saved on SIGTERM (preempted, node
    failure, `scontrol requeue`); no checkpoint at all stops the job with an error saying where the CLI
    looked, instead of training again from step 0 (src/training/resume.py); for an array, Lightning's
    own rule applies (the HPC checkpoint in each task's `default_root_dir`, if there is one).
    """
    if isinstance(ntasks_per_node, bool) or not isinstance(ntasks_per_node, int) or ntasks_per_node < 1:
        raise SlurmError(f"ntasks_per_node must be an integer >= 1, not {ntasks_per_node!r}")
    if array is not None and not re.fullmatch(r"[0-9][0-9,\-%:]*", str(array)):
        raise SlurmError(f"array {array!r} is not a SLURM --array range (e.g. 0-7, 0-7%4, 1,3,5)")
    for arg in cli_args:
        if "\n" in str(arg):
            raise SlurmError(f"a command-line argument holds a line break: {arg!r}")
    run_dir = Path(run_dir).absolute()
    program = list(DEFAULT_COMMAND if command is None else command)
    is_fit = tuple(program) == DEFAULT_COMMAND

    lines = ["#!/bin/bash"]

    def sbatch(option: str) -> None:
        lines.append(f"#SBATCH {option}")

    sbatch(f"--job-name={settings.job_name}")
    sbatch(f"--nodes={settings.nodes}")
    sbatch(f"--ntasks-per-node={ntasks_per_node}")
    sbatch(f"--cpus-per-task={settings.cpus_per_task}")
    if settings.gpus_per_node:
        sbatch(f"--gpus-per-node={settings.gpus_per_node}")
    if settings.mem:
        sbatch(f"--mem={settings.mem}")
    for name in ("partition", "account", "qos"):
        if getattr(settings, name):
            sbatch(f"--{name}={getattr(settings, name)}")
    sbatch(f"--time={settings.time}")
    if array is not None:
        sbatch(f"--array={array}")
    sbatch(f"--signal=SIGUSR1@{settings.signal_seconds}")
    sbatch("--requeue")
    sbatch("--open-mode=append")
    sbatch(f"--chdir={_sbatch_path(Path.cwd())}")
    sbatch(f"--output={_sbatch_path(run_dir)}/slurm-{'%A_%a' if array is not None else '%j'}.out")
    lines += [_sbatch_line(line) for line in settings.extra_sbatch]

    lines += [
        "",
        "# Written by `python -m src.launch.slurm` (see docs/slurm.md). SIGUSR1 comes before the time limit:",
        "# the run saves hpc_ckpt_N.ckpt in its folder at the end of the step and requeues this job.",
        "set -e",
        "export PYTHONUNBUFFERED=1",
    ]
    lines += list(settings.setup)
    lines.append(
        'echo "== SLURM job ${SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+ (array task ${SLURM_ARRAY_TASK_ID})}'
        " restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST} at $(date '+%F %T')\""
    )
    args = [_shell_arg(a) for a in cli_args]
    srun = ["srun", "--kill-on-bad-exit=1", f"--cpus-per-task={settings.cpus_per_task}", _shell_arg(settings.python)]
    srun += [_shell_arg(p) for p in program] + args
    if is_fit:
        srun += [_shell_arg(a) for a in REQUEUE_ARGS]
        if array is None:
            lines += [
                "# requeued: resume from the run's newest checkpoint that loads (the one written on the signal, or",
                "# the newest periodic or SIGTERM one); none is an error, never a silent start from step 0",
                "RESUME=()",
                'if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then RESUME=(--ckpt_path=last); fi',
            ]
            srun.append('"${RESUME[@]}"')
    lines.append(" ".join(srun))
    return "\n".join(lines) + "\n"


def submit(script: str, run_dir: str | os.PathLike) -> str:
    """Writes `run_dir/job.sbatch` (creating `run_dir`) and submits it with `sbatch --parsable`; returns
    the job id. A missing `sbatch` or a refusal is a `SlurmError` with sbatch's message."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "job.sbatch"
    path.write_text(script)
    try:
        done = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        raise SlurmError(
            "sbatch is not on PATH: submit from a SLURM login node, or print the script with --dry-run"
        ) from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"sbatch did not answer in 300 s; the script is {path}") from None
    if done.returncode != 0:
        raise SlurmError(f"sbatch refused {path} (exit code {done.returncode}): {done.stderr.strip()}")
    match = re.search(r"^(\d+)(?:;\S+)?\s*$", done.stdout.strip(), re.MULTILINE) or re.search(
        r"Submitted batch job (\d+)", done.stdout
    )
    if match is None:
        raise SlurmError(f"could not read a job id from sbatch's output: {done.stdout!r}")
    return match.group(1)


# ---- the Trainer's shape, from the kit's own CLI parser -------------------------------------------


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
    return _shape_of(trainer_config(config_paths, overrides))


def _shape_of(trainer: Mapping[str, Any]) -> tuple[int, int]:
    nodes = trainer.get("num_nodes", 1)
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise SlurmError(f"trainer.num_nodes must be an integer >= 1, not {nodes!r}")
    return nodes, _count_devices(trainer.get("devices", "auto"), trainer.get("accelerator", "auto"))


# ---- the run side: checkpoint and requeue on SLURM's signal ---------------------------------------


def _job_id() -> str | None:
    """This job's id for scontrol: `<array job>_<task>` in an array."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID")


def _requeue_this_job() -> bool:
    """`scontrol requeue` for the job (or array task) this process runs in; True if SLURM took it."""
    job = _job_id()
    if not job or not re.fullmatch(r"[0-9_]+", job):
        log.warning("no SLURM job id in the environment: not requeued")
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.warning(f"scontrol requeue {job} failed: {error}")
        return False
    if done.returncode != 0:
        log.warning(f"scontrol requeue {job} failed (exit code {done.returncode}): {done.stderr.strip()}")
        return False
    return True


class SlurmRequeue(Callback):
    """Checkpoint and requeue on SLURM's warning signal, at a step boundary on every rank together.

    Lightning's own handler (`SLURMEnvironment(auto_requeue=True)`, the default) saves the checkpoint
    inside the signal handler, wherever each rank happens to be: in the middle of a backward pass, or
    in a collective the other ranks have not reached, which can hang or record a half-done step
    (Lightning issue #21406). This callback takes the signal over (its handler only notes it), and at
    the end of each optimizer step the ranks agree (one all-reduce of a flag) whether any was
    signalled; if so, every rank calls `trainer.save_checkpoint(default_root_dir/hpc_ckpt_N.ckpt)` at
    that same point, where the `--ckpt_path` resume is exact, logs the step's metrics and flushes its
    loggers; then rank 0 runs `scontrol requeue` (older HPC checkpoints beyond `keep` are removed) and
    every rank exits at once (status 0), ahead of the SIGTERM with which SLURM stops the job. If the
    requeue fails, rank 0 says so and exits with status 1: the job fails, its checkpoint saved, and
    a resubmission of the same command resumes from it (Lightning restores an HPC checkpoint it finds).

    Active only in `fit` under SLURM with `auto_requeue` (the signal: the environment's
    `requeue_signal`, SIGUSR1); otherwise it does nothing. A signal that comes during validation is
    acted on after it. Data-loader workers, which SLURM signals too, ignore it.

    every_n_steps: agree every n optimizer steps instead of every step (fewer collectives; the signal
        must then come at least n steps before the limit).
    keep: HPC checkpoints kept in the run folder (the newest).
    """

    def __init__(self, every_n_steps: int = 1, keep: int = 1) -> None:
        if every_n_steps < 1 or keep < 1:
            raise ValueError(f"SlurmRequeue: every_n_steps and keep must be >= 1, not {every_n_steps}, {keep}")
        self.every_n_steps, self.keep = every_n_steps, keep
        self._signum: int | None = None
        self._previous: Any = None
        self._pid: int | None = None
        self._requested = False
        self._steps = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        from lightning.fabric.plugins.environments import SLURMEnvironment

        if stage != "fit" or self._signum is not None:
            return
        environment = getattr(trainer._accelerator_connector, "cluster_environment", None)
        if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue):
            return
        if next(cb for cb in trainer.callbacks if isinstance(cb, SlurmRequeue)) is not self:
            return  # listed twice: the first one acts
        if threading.current_thread() is not threading.main_thread():
            return
        # installed before the Trainer registers its handlers, so Lightning leaves this signal to us
        self._signum = int(environment.requeue_signal or signal.SIGUSR1)
        self._pid = os.getpid()
        self._previous = signal.signal(self._signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if os.getpid() == self._pid:  # forked data-loader workers inherit the handler
            self._requested = True

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._signum is not None and threading.current_thread() is threading.main_thread():
            signal.signal(self._signum, self._previous if self._previous is not None else signal.SIG_DFL)
        self._signum = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._signum is None or trainer.fit_loop._should_accumulate():
            return
        self._steps += 1
        if self._steps % self.every_n_steps:
            return
        if not trainer.strategy.reduce_boolean_decision(self._requested, all=False):
            return
        self._requested = False
        self._checkpoint_and_requeue(trainer)

    def _checkpoint_and_requeue(self, trainer) -> None:
        from lightning.pytorch.utilities.rank_zero import rank_zero_info

        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        name = signal.Signals(self._signum).name
        rank_zero_info(f"{name} from SLURM: saving {path} at step {trainer.global_step}, then requeueing the job")
        trainer.save_checkpoint(path, weights_only=False)
        # this step's metrics, which the loop would log right after this hook, and the loggers' files
        trainer._logger_connector.update_train_step_metrics()
        for logger in trainer.loggers:
            logger.finalize("finished")
        # The requeue makes SLURM stop the job: SIGTERM to every process, SIGKILL after KillWait. Lightning's
        # SIGTERM handler would run a collective inside the handler (with ranks already gone), and torch's
        # SIGCHLD handler raises when the data-loader workers die of it: both are switched off, and every
        # rank leaves by itself, without a teardown. The barrier is the last collective.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        trainer.strategy.barrier("SlurmRequeue")
        code = 0
        if trainer.is_global_zero:
            self._prune(Path(path))
            if _requeue_this_job():
                print(f"requeued SLURM job {_job_id()}: stopping; it resumes from {path}", file=sys.stderr)
            else:
                print(
                    f"SLURM job {_job_id()} was not requeued: stopping; resubmit it to resume from {path}",
                    file=sys.stderr,
                )
                code = 1
        else:
            time.sleep(1.0)  # let rank 0 read the barrier's last messages before this socket closes
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def _prune(self, newest: Path) -> None:
        found = sorted(
            (int(m.group(1)), newest.parent / name)
            for name in os.listdir(newest.parent)
            if (m := HPC_CHECKPOINT.match(name))
        )
        for _, old in found[: max(0, len(found) - self.keep)]:
            if old == newest:
                continue
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)


# ---- the command line ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m src.launch.slurm",
        description="Submit `python -m src.cli fit --config ...` as a SLURM batch job (docs/slurm.md). "
        "Arguments after `--` go to the training CLI (`-- --trainer.max_steps 100`).",
    )
    p.add_argument("--config", action="append", required=True, help="training config (repeatable, as for src.cli)")
    p.add_argument("--slurm-config", help="YAML with the slurm settings (a `slurm:` section, or the settings alone)")
    p.add_argument("--nodes", type=int, help="must equal trainer.num_nodes (taken from the config when left out)")
    p.add_argument("--ntasks-per-node", type=int, help="must equal trainer.devices (taken from the config)")
    p.add_argument("--gpus-per-node", type=int, help="default: trainer.devices for a gpu/cuda accelerator, else 0")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--mem")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--time", help="e.g. 24:00:00 or 2-00:00:00")
    p.add_argument("--job-name")
    p.add_argument("--sbatch", action="append", default=[], metavar="LINE", help="extra #SBATCH line (repeatable)")
    p.add_argument("--setup", action="append", default=[], metavar="LINE", help="shell line before srun (repeatable)")
    p.add_argument("--signal-seconds", type=int, help="SIGUSR1 this long before the time limit (default 90)")
    p.add_argument("--python", help="interpreter srun starts (default: python)")
    p.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1 :]
    args = _parser().parse_args(argv)
    try:
        raw, _ = _settings_mapping(args.slurm_config)
        settings = load_settings(args.slurm_config)
        flags = {
            name: getattr(args, name)
            for name in ("cpus_per_task", "mem", "partition", "account", "qos", "time", "job_name", "signal_seconds")
            if getattr(args, name) is not None
        }
        if args.python is not None:
            flags["python"] = args.python
        flags["extra_sbatch"] = settings.extra_sbatch + args.sbatch
        flags["setup"] = settings.setup + args.setup
        trainer = trainer_config(args.config, [*overrides, *REQUEUE_ARGS])  # what the job's command line parses
        nodes, devices = _shape_of(trainer)
        asked_nodes = args.nodes if args.nodes is not None else raw.get("nodes")
        if asked_nodes is not None and asked_nodes != nodes:
            raise SlurmError(
                f"--nodes {asked_nodes} but the config's trainer.num_nodes is {nodes}: they must be equal "
                f"(pass `-- --trainer.num_nodes {asked_nodes}`, or leave --nodes out)"
            )
        if args.ntasks_per_node is not None and args.ntasks_per_node != devices:
            raise SlurmError(
                f"--ntasks-per-node {args.ntasks_per_node} but the config's trainer.devices is {devices}: they must "
                f"be equal, one rank per device (pass `-- --trainer.devices {args.ntasks_per_node}`)"
            )
        accelerator = trainer.get("accelerator")
        gpus = args.gpus_per_node if args.gpus_per_node is not None else raw.get("gpus_per_node")
        if gpus is None:
            gpus = devices if accelerator in ("gpu", "cuda") else settings.gpus_per_node
        elif accelerator in ("gpu", "cuda") and isinstance(gpus, int) and gpus < devices:
            raise SlurmError(f"--gpus-per-node {gpus} is fewer than trainer.devices {devices}")
        settings = dataclasses.replace(settings, nodes=nodes, gpus_per_node=gpus, **flags)
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
