"""The sbatch script (`render`) and its submission (`submit`)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

from src.launch.slurm.settings import SlurmError, SlurmSettings

ARRAY_TASK_ID = "${SLURM_ARRAY_TASK_ID}"
"""The one shell expansion `render` leaves in `cli_args`: an array task's index."""

REQUEUE_CALLBACK = "src.launch.slurm.SlurmRequeue"
REQUEUE_ARGS = [f"--trainer.callbacks+={REQUEUE_CALLBACK}"]
"""CLI args that add `SlurmRequeue` to a run (after every `--config`: a later config would replace the
callback list). `render` appends them to `src.cli fit`; a program of its own (`command=`) adds them itself."""

DEFAULT_COMMAND = ("-m", "src.cli", "fit")


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
