"""A run's home, the checkpoint a restart resumes from, and a clean stop on SIGTERM / SIGINT.

A run keeps its checkpoints and logs in one folder that a restart finds again: the logger's
`<default_root_dir>/lightning_logs/version_N/` (checkpoints in its `checkpoints/`, or in a
`ModelCheckpoint(dirpath=...)` the config fixes), SLURM's `hpc_ckpt_*.ckpt` in `default_root_dir`.
`--ckpt_path last` resumes the newest checkpoint there that loads, and the resumed run keeps logging
into the same `version_N` (`find_resume_checkpoint`, `keep_logger_version`; the CLI calls them), so
TensorBoard shows one run whose curves go on across restarts.

Why not Lightning's own `"last"`: it looks only in the folder of the *new* run (a fresh `version_N+1`,
empty), finds nothing, warns and trains from step 0; and it trusts `last.ckpt`, which a kill between
writing `step=30.ckpt` and updating `last.ckpt` leaves behind the newer checkpoint.

`StopOnSignal` (added to every `fit` by the CLI): SIGTERM or SIGINT saves a checkpoint at the end of
the current optimizer step, on every rank together, and the run exits with status 0.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from src.model.weights import read_checkpoint

log = logging.getLogger(__name__)

RESUME_FROM_NEWEST = "last"  # --ckpt_path last: the run's newest valid checkpoint; none is an error
RESUME_IF_ANY = "auto"  # --ckpt_path auto: the same, or a new run when there is none (said on stderr)
CHECKPOINT_SUFFIX = ".ckpt"
HPC_CHECKPOINT = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")
VERSION_FOLDER = re.compile(r"^version_(\d+)$")
DCP_META = "meta.pt"  # what Lightning writes beside a distributed (FSDP2) checkpoint's shards


class NoCheckpoint(FileNotFoundError):
    """`--ckpt_path last` and nothing to resume from: the message says where the search looked."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    mtime: float


@dataclass
class Resume:
    """What `find_resume_checkpoint` found: the file, the logger version it belongs to, and what it
    passed over (unreadable files, with why)."""

    path: Path | None
    version: str | None
    looked_in: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    step: int | None = None


# ---- where a run keeps its checkpoints ------------------------------------------------------------


def log_root(trainer: Trainer) -> Path | None:
    """The first logger's run folder, `<save_dir>/<name>` (holding `version_N/`); None without one."""
    if not trainer.loggers:
        return None
    logger = trainer.loggers[0]
    root = getattr(logger, "root_dir", None) or logger.save_dir
    if root is None or "://" in str(root):
        return None
    return Path(root)


def checkpoint_folders(trainer: Trainer) -> list[Path]:
    """Every folder where this run's checkpoints can be: each `ModelCheckpoint`'s fixed `dirpath`, and
    the `checkpoints/` of every logger version (where ModelCheckpoint writes when it has no dirpath)."""
    folders: list[Path] = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath and "://" not in str(callback.dirpath):
            folders.append(Path(callback.dirpath))
    root = log_root(trainer)
    if root is not None:
        folders.append(root / "*" / "checkpoints")  # said as a pattern in messages; expanded below
    else:
        folders.append(Path(trainer.default_root_dir) / "checkpoints")
    return list(dict.fromkeys(folders))


def expand_folders(patterns: Iterable[Path]) -> list[Path]:
    """The existing folders that `checkpoint_folders`' entries name (`*` stands for any version folder)."""
    found = []
    for folder in patterns:
        if "*" in folder.parts:
            star = folder.parts.index("*")
            base, rest = Path(*folder.parts[:star]), Path(*folder.parts[star + 1 :])
            if base.is_dir():
                found += sorted(p / rest for p in base.iterdir() if (p / rest).is_dir())
        elif folder.is_dir():
            found.append(folder)
    return list(dict.fromkeys(found))


def _entries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(CHECKPOINT_SUFFIX)]


# ---- which checkpoint ------------------------------------------------------------------------------


def stored_step(path: Path) -> int:
    """The optimizer step a checkpoint holds, read through the kit's weights-only loader (memory-mapped:
    tensors are not read), so a file that does not load, or is not a kit checkpoint, raises."""
    if path.is_dir():  # a distributed checkpoint: its shards' index, and Lightning's metadata file
        read_checkpoint(path, "checkpoint")
        meta = torch.load(path / DCP_META, map_location="cpu", weights_only=True)
        return int(meta["global_step"])
    return int(read_checkpoint(path, "checkpoint")["global_step"])


def _valid(paths: Iterable[Path], skipped: list[tuple[Path, str]]) -> list[Checkpoint]:
    found = []
    for path in paths:
        try:
            found.append(Checkpoint(path, stored_step(path), path.stat().st_mtime))
        except Exception as error:  # a kill mid-save, a disk error, a foreign file: pass it over, say why
            skipped.append((path, (str(error).splitlines() or [type(error).__name__])[0][:200]))
    return found


def _newest(found: Sequence[Checkpoint]) -> Checkpoint:
    """The highest step; between equal steps the later file."""
    return max(found, key=lambda c: (c.step, c.mtime))


def version_of(path: Path, root: Path | None) -> str | None:
    """`version_N` when `path` is `<root>/version_N/checkpoints/x.ckpt`."""
    if root is None:
        return None
    try:
        parts = path.resolve().relative_to(root.resolve()).parts
    except ValueError:
        return None
    return parts[0] if len(parts) == 3 and parts[1] == "checkpoints" else None


def newest_version(root: Path | None) -> str | None:
    """The logger version folder written last (by its event files, metrics and checkpoints)."""
    if root is None or not root.is_dir():
        return None
    written = {}
    for folder in root.iterdir():
        if not folder.is_dir():
            continue
        files = [p for p in folder.iterdir() if p.name.startswith("events.out.tfevents.") or p.name == "metrics.csv"]
        if (folder / "checkpoints").is_dir():
            files += list((folder / "checkpoints").iterdir())
        if files:
            written[folder.name] = max(p.stat().st_mtime for p in files)
    return max(written, key=written.get) if written else None


def find_resume_checkpoint(trainer: Trainer) -> Resume:
    """The checkpoint `--ckpt_path last` resumes: in the run written most recently (the checkpoint
    folder whose newest file is the latest), the checkpoint with the highest stored step that loads,
    SLURM's `hpc_ckpt_*.ckpt` competing by step too. Files that do not load are passed over (listed in
    `skipped`); an older run is taken only when the newest holds none that loads."""
    root = log_root(trainer)
    patterns = checkpoint_folders(trainer)
    skipped: list[tuple[Path, str]] = []
    groups = [(folder, _entries(folder)) for folder in expand_folders(patterns)]
    groups = sorted((g for g in groups if g[1]), key=lambda g: max(p.stat().st_mtime for p in g[1]), reverse=True)
    home = Path(trainer.default_root_dir)
    hpc = _valid(sorted(p for p in home.glob("hpc_ckpt_*.ckpt") if HPC_CHECKPOINT.match(p.name)), skipped)
    chosen: list[Checkpoint] = []
    for _, paths in groups:
        chosen = _valid(sorted(paths), skipped)
        if chosen:
            break
    looked_in = [*patterns, home / "hpc_ckpt_*.ckpt"]
    if not chosen and not hpc:
        return Resume(None, None, looked_in, skipped)
    best = _newest(chosen + hpc)
    version = version_of(best.path, root) or (version_of(chosen[0].path, root) if chosen else None)
    version = version or newest_version(root)
    return Resume(best.path, version, looked_in, skipped, best.step)


def describe_search(resume: Resume) -> str:
    where = ", ".join(str(p) for p in resume.looked_in)
    unreadable = "".join(f"; passed over {path}: {why}" for path, why in resume.skipped)
    return f"looked in {where}{unreadable}"


def keep_logger_version(trainer: Trainer, version: str) -> list[str]:
    """Points the trainer's loggers (TensorBoard, CSV) at the existing `version` folder, so a resumed run
    appends to the run it resumes; returns the loggers it could not point there (by class name)."""
    number = VERSION_FOLDER.match(version)
    value: int | str = int(number.group(1)) if number else version
    left = []
    for logger in trainer.loggers:
        if not hasattr(logger, "_version") or getattr(logger, "_experiment", None) is not None:
            left.append(type(logger).__name__)
            continue
        logger._version = value  # read lazily by log_dir / the checkpoint folder; nothing is written yet
    return left


# ---- SIGTERM / SIGINT: a checkpoint at the end of the step, then exit 0 ----------------------------


class _QuietWorkers:
    """Data-loader workers ignore SIGTERM and SIGINT while a `StopOnSignal` run trains.

    A signal sent to the process group (Ctrl-C, `kill -- -PGID`, systemd, SLURM) reaches the workers
    too; torch's worker handler makes them die of it, and the main process then fails with a
    "DataLoader worker ... killed" traceback before it can save. The main process stops them itself
    when it exits. torch installs its worker handlers in `_set_worker_signal_handlers` before the
    worker's loop; wrapping it is the one place that covers every loader, whoever built it."""

    def __init__(self) -> None:
        from torch.utils.data._utils import signal_handling

        self.module = signal_handling
        self.original = signal_handling._set_worker_signal_handlers

    def install(self) -> None:
        original = self.original

        def set_handlers(*args: Any) -> None:
            original(*args)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)

        self.module._set_worker_signal_handlers = set_handlers

    def remove(self) -> None:
        self.module._set_worker_signal_handlers = self.original


class StopOnSignal(Callback):
    """SIGTERM or SIGINT during `fit`: a checkpoint at the end of the current optimizer step, then exit 0.

    The handler only notes the signal. At the end of each optimizer step the ranks agree (one all-reduce
    of a flag) whether any was signalled; if so every rank saves `last.ckpt` in the run's checkpoint
    folder (the first `ModelCheckpoint`'s, else the logger version's `checkpoints/`), the step's metrics
    are logged, and the run stops as Lightning stops on SIGTERM (`SIGTERMException`, exit status 0):
    loggers closed, data-loader workers shut down by the loader, not killed. `--ckpt_path last` resumes
    from that checkpoint exactly. A second SIGINT (Ctrl-C twice) interrupts at once, as Python does.
    A signal during validation is acted on at the end of the next step. This replaces Lightning's own
    SIGTERM handler, which stops without a checkpoint and, with several processes, runs a collective
    inside the handler. SLURM's SIGUSR1 stays `SlurmRequeue`'s.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self._pid: int | None = None
        self._previous: dict[int, Any] = {}
        self._received: int | None = None
        self._workers: _QuietWorkers | None = None

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        if next(cb for cb in trainer.callbacks if isinstance(cb, StopOnSignal)) is not self:
            return  # listed twice: the first one acts
        self._workers = _QuietWorkers()
        self._workers.install()  # before the first loader forks its workers

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        if self._workers is None:
            return
        self._pid, self._received = os.getpid(), None
        for signum in self.SIGNALS:  # after the Trainer registered its own SIGTERM handler: this one wins
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked child that inherited the handler
            return
        if self._received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now
        if self._received is None:
            name = signal.Signals(signum).name
            print(f"{name}: saving a checkpoint at the end of this step, then stopping", flush=True)
        self._received = signum

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._pid is None or trainer.fit_loop._should_accumulate():
            return
        if not trainer.strategy.reduce_boolean_decision(self._received is not None, all=False):
            return
        path = stop_checkpoint_path(trainer)
        rank_zero_info(f"stopping on a signal: saving {path} at step {trainer.global_step}")
        if trainer.is_global_zero and path.is_symlink():  # save_last="link": never write through the link
            path.unlink()
        trainer.strategy.barrier("StopOnSignal")
        trainer.save_checkpoint(path)
        trainer._logger_connector.update_train_step_metrics()  # the step's metrics, which the loop logs next
        rank_zero_info(f"saved {path}; resume with --ckpt_path last")
        self._restore()  # Lightning does not run callbacks' teardown after an exception
        raise SIGTERMException(0)

    def on_exception(self, trainer: Trainer, pl_module: Any, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        """The signal handlers and torch's worker set-up as they were (running workers keep theirs)."""
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous, self._pid = {}, None
        if self._workers is not None:
            self._workers.remove()
            self._workers = None


def stop_checkpoint_path(trainer: Trainer) -> Path:
    """`last.ckpt` where this run's checkpoints go, so `--ckpt_path last` and a reader of the folder find it."""
    callback = trainer.checkpoint_callback
    name = f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        return Path(callback.dirpath) / name
    log_dir = trainer.log_dir
    return Path(log_dir if log_dir else trainer.default_root_dir) / "checkpoints" / name
