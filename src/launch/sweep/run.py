"""Running a sweep's runs: one run in this process (`run-one`: fit, facts, test, markers), or every
unfinished run here, one after another, each in a child process."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from src.launch.sweep.folders import (
    DONE,
    FACTS,
    FAILED,
    FIT_DONE,
    LOG,
    RUN_FILE,
    RUNS_FILE,
    last_checkpoint,
    prepare,
    resume_checkpoint,
)
from src.launch.sweep.plan import Run
from src.launch.sweep.spec import Sweep, SweepError


def _global_rank() -> int:
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def run_one(sweep_dir: str | Path, index: int) -> str:
    """Runs line `index` (from 0) of `SWEEP/runs.txt` in this process: fit (resuming from its last
    checkpoint if it stopped part-way), `facts.json`, test with the last checkpoint, `DONE`.

    Under several processes (srun, one task per GPU) every rank calls this; only rank 0 writes the
    markers. Returns the run's status.
    """
    lines = (Path(sweep_dir) / RUNS_FILE).read_text().splitlines()
    if not 0 <= index < len(lines):
        raise SweepError(f"index {index} is outside {Path(sweep_dir) / RUNS_FILE} ({len(lines)} runs)")
    run_dir = Path(lines[index])
    info = json.loads((run_dir / RUN_FILE).read_text())
    if (run_dir / DONE).exists():
        print(f"{info['name']}: done already")
        return "done"
    os.chdir(info["cwd"])
    config = run_dir / "config.yaml"
    zero = _global_rank() == 0
    started = time.time()
    try:
        from src.cli import main as cli_main

        # the CLI is given its args while sys.argv holds run-one's: kept, as Lightning's DDP launcher
        # starts the other ranks with this process's own command line
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        if not (run_dir / FIT_DONE).exists():
            args = ["fit", "--config", str(config)]
            if os.environ.get("SLURM_JOB_ID"):  # checkpoint and requeue before the time limit (docs/slurm.md)
                from src.launch.slurm import REQUEUE_ARGS

                args += REQUEUE_ARGS
            resume = resume_checkpoint(run_dir)
            if resume is not None:
                print(f"{info['name']}: resuming from {resume}")
                args += ["--ckpt_path", str(resume)]
            cli = cli_main(args)
            zero = cli.trainer.is_global_zero
            if zero:
                (run_dir / FACTS).write_text(json.dumps(model_facts(cli.model), indent=2) + "\n")
                (run_dir / FIT_DONE).write_text(f"{cli.trainer.global_step}\n")
            del cli
            gc.collect()
        metrics: dict[str, float] = {}
        if info["test"]:
            checkpoint = last_checkpoint(run_dir)
            if checkpoint is None:
                raise SweepError(f"{info['name']}: fit wrote no checkpoint under {run_dir / 'checkpoints'} to test")
            args = ["test", "--config", str(config), "--ckpt_path", str(checkpoint)]
            if info.get("sweep_logger"):
                args.append("--trainer.logger.init_args.version=test")  # RUN/logs/test, beside RUN/logs/fit
            cli = cli_main(args)
            zero = cli.trainer.is_global_zero
            metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
            del cli
            gc.collect()
    except BaseException as error:
        requeued = isinstance(error, SystemExit) and any(
            p.stat().st_mtime >= started for p in run_dir.glob("hpc_ckpt_*.ckpt")
        )  # SlurmRequeue saved and requeued the job: it stopped, it did not fail
        if zero and not requeued:
            (run_dir / FAILED).write_text(traceback.format_exc())
        raise
    if zero:
        (run_dir / FAILED).unlink(missing_ok=True)
        done = {"seconds": round(time.time() - started, 1), "test": metrics}
        (run_dir / DONE).write_text(json.dumps(done, indent=2) + "\n")
    return "done"


def model_facts(module: Any) -> dict[str, Any]:
    """What the built model is: trainable and total parameters (per part when the module counts them
    per part, as `LlavaLitModule.parameter_counts` does) and the tokens one image view becomes."""
    counts = module.parameter_counts() if hasattr(module, "parameter_counts") else None
    if counts:
        trainable = sum(t for t, _ in counts.values())
        total = sum(a for _, a in counts.values())
        parts = {part: {"trainable": t, "total": a} for part, (t, a) in counts.items()}
    else:
        params = list(module.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        parts = {}
    model = getattr(module, "model", None)
    return {
        "trainable_params": int(trainable),
        "total_params": int(total),
        "parts": parts,
        "image_tokens_per_view": getattr(model, "image_tokens", None),
    }


def _command(sweep_dir: Path, index: int | str) -> list[str]:
    return ["python", "-m", "src.launch.sweep", "run-one", "--sweep", str(sweep_dir), "--index", str(index)]


def run_local(sweep: Sweep, runs: Sequence[Run], dry_run: bool = False, stream: bool = False) -> int:
    """Runs the unfinished runs one after another, each in a child process (`run-one`) whose output
    goes to RUN/run.log (or to this terminal with `stream`). A failed run is recorded (RUN/FAILED) and
    the sweep goes on; returns the number of runs that failed."""
    statuses = prepare(sweep, runs)
    todo = [r for r in runs if statuses[r.name] != "done"]
    print(f"{sweep.out}: {len(runs)} runs, {len(runs) - len(todo)} done, {len(todo)} to run")
    failed = 0
    for n, run in enumerate(todo, 1):
        command = [sys.executable, *_command(sweep.out, run.index)[1:]]
        if dry_run:
            print(" ".join(_command(sweep.out, run.index)), f"# {run.name} ({statuses[run.name]})")
            continue
        print(f"[{n}/{len(todo)}] {run.name} ...", end="" if not stream else "\n", flush=True)
        started = time.time()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if stream:
            code = subprocess.call(command, cwd=sweep.cwd, env=env)
        else:
            with open(run.path / LOG, "a") as log:
                code = subprocess.call(command, cwd=sweep.cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        seconds = time.time() - started
        if code == 0 and (run.path / DONE).exists():
            print(f" done in {seconds:.1f} s")
            continue
        failed += 1
        if not (run.path / FAILED).exists():
            (run.path / FAILED).write_text(f"exit code {code}\n")
        print(f" FAILED (exit code {code}) after {seconds:.1f} s; see {run.path / LOG}")
    return failed
