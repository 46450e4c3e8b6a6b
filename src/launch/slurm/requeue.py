"""The run side: `SlurmRequeue`, the callback that checkpoints and requeues a run on SLURM's warning
signal, at a step boundary on every rank together.

Time limits and preemption: SLURM sends SIGUSR1 `signal_seconds` before the limit. `SlurmRequeue`
(added to every run the script starts) notes it, and at the end of the next optimizer step, on every
rank at once, saves `hpc_ckpt_N.ckpt` in the run folder (Lightning's HPC checkpoint), runs `scontrol
requeue` and stops. The requeued job (same job id, same script) resumes with `--ckpt_path=last`, the
run's newest checkpoint that loads (that one, or a newer periodic one), weights, optimizer, counters
and the data stream's position (`LlavaDataModule.state_dict`) alike, and logs into the same
`version_<job id>` folder. A job requeued without the signal (node failure, preemption, `scontrol
requeue`: SIGTERM, on which `StopOnSignal` saves at the end of the step) resumes the same way; with no
checkpoint at all it fails with the places searched rather than starting over. See docs/slurm.md.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback

log = logging.getLogger(__name__)

HPC_CHECKPOINT = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


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
