"""The sweep's folder on disk: `runs.txt`, `sweep.json`, each run's `config.yaml` and `run.json`, and
the marker files that say where a run stands (done, failed, partial, pending)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from src.launch.sweep.names import column_labels, is_seed
from src.launch.sweep.plan import Run, base_config, run_config, sweep_logger, wants_test
from src.launch.sweep.spec import Sweep, SweepError

RUNS_FILE = "runs.txt"  # one run folder per line; line i (from 0) is SLURM array task i
MANIFEST = "sweep.json"
RUN_FILE = "run.json"  # per run: its name, swept values, whether it tests, the directory it runs from
DONE, FIT_DONE, FAILED = "DONE", "FIT_DONE", "FAILED"
FACTS = "facts.json"
LOG = "run.log"


def status(run_dir: Path) -> str:
    """done | failed | partial (stopped after a checkpoint; resumes) | pending."""
    if (run_dir / DONE).exists():
        return "done"
    if (run_dir / FAILED).exists():
        return "failed"
    if (run_dir / FIT_DONE).exists() or resume_checkpoint(run_dir) is not None:
        return "partial"
    return "pending"


def last_checkpoint(run_dir: Path) -> Path | None:
    """The run's `checkpoints/last.ckpt` (a file, a link or an FSDP2 folder), else its newest `*.ckpt`."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return None
    last = folder / "last.ckpt"
    if last.exists():
        return last
    found = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def resume_checkpoint(run_dir: Path) -> Path | None:
    """Where a stopped run resumes: the newest of its `last_checkpoint` and the `hpc_ckpt_N.ckpt` that
    `src.launch.slurm.SlurmRequeue` writes into the run folder before a time limit."""
    found = list(run_dir.glob("hpc_ckpt_*.ckpt"))
    last = last_checkpoint(run_dir)
    if last is not None:
        found.append(last)
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _dump(config: Mapping[str, Any]) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(dict(config)))


def prepare(sweep: Sweep, runs: Sequence[Run]) -> dict[str, str]:
    """Writes the sweep's folder: `runs.txt`, `sweep.json`, and each run's `config.yaml` and `run.json`.

    A finished run's config is left as it is (a changed spec does not silently re-label old results:
    it warns). An unfinished run whose config changed and that has checkpoints is refused: resuming
    would mix two configs. Returns each run's status.
    """
    base = base_config(sweep)
    sweep.out.mkdir(parents=True, exist_ok=True)
    statuses: dict[str, str] = {}
    columns = list(runs[0].labels) if runs else []
    for run in runs:
        config = run_config(sweep, run, base)
        text = _dump(config)
        path = run.path / "config.yaml"
        state = status(run.path)
        old = path.read_text() if path.is_file() else None
        if old is not None and old != text:
            if state == "done":
                print(f"warning: {run.name} is done with a different config; delete {run.path} to run it again")
                statuses[run.name] = state
                continue
            if (run.path / FIT_DONE).exists() or resume_checkpoint(run.path) is not None:
                raise SweepError(
                    f"{run.name} has checkpoints of a different config (resuming would mix the two); "
                    f"delete {run.path} to start it again"
                )
        run.path.mkdir(parents=True, exist_ok=True)
        if old != text:
            path.write_text(text)
        info = {
            "name": run.name,
            "index": run.index,
            "labels": run.labels,
            "values": run.values,
            "test": wants_test(sweep.test, config),
            "sweep_logger": config["trainer"]["logger"] == sweep_logger(run.path),
            "cwd": str(sweep.cwd),
        }
        (run.path / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")
        statuses[run.name] = state
    (sweep.out / RUNS_FILE).write_text("".join(f"{run.path}\n" for run in runs))
    manifest = {
        "spec": str(sweep.spec_path) if sweep.spec_path else None,
        "cwd": str(sweep.cwd),
        "columns": columns,
        "seeds": [col for key, col in column_labels(_swept_keys(sweep)).items() if is_seed(key)],
        "runs": [{"name": r.name, "dir": str(r.path), "labels": r.labels} for r in runs],
    }
    (sweep.out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return statuses


def _swept_keys(sweep: Sweep) -> list[str]:
    return list(sweep.grid) + list((sweep.random or {}).get("space") or {})
