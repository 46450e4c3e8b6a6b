"""Sweeps: one YAML spec -> many runs, each in its own folder; run them here or as one SLURM job array;
collect their TensorBoard scalars and benchmark reports into tables (95% confidence intervals over seeds,
differences beyond the seed noise) and plots.

    python -m src.launch.sweep plan experiments/sweeps/demo_projectors.yaml
    python -m src.launch.sweep run experiments/sweeps/demo_projectors.yaml --local
    python -m src.launch.sweep run experiments/sweeps/projectors.yaml --slurm [--slurm-config cluster.yaml] [--dry-run]
    python -m src.launch.sweep collect experiments/sweeps/demo_projectors.yaml   # or the sweep's folder

A spec (see docs/sweeps.md):

    base: [lightning_config.yaml]          # configs merged in order (omegaconf), like repeated --config
    overrides: {trainer: {max_steps: 6}}   # merged into every run (nested or dotted keys)
    grid:                                  # the cartesian product; each value replaces its key
      model.projector: [{name: linear}, {name: mlp, kwargs: {depth: 2}}]
      seed_everything: [0, 1]
    random:                                # optional: n draws, crossed with the grid
      n: 4
      seed: 0
      space: {model.optimizer.lr: {log_uniform: [1.0e-5, 1.0e-3]}}
    out: runs/sweeps/projectors            # the sweep's folder
    test: auto                             # test each run after fit: auto (when data.test_shards is set) | true | false
    slurm: cluster.yaml                    # optional: settings for --slurm (src.launch.slurm.load_settings)

Each run is `OUT/<name>/` with `config.yaml`, the resolved, merged config (default_root_dir, the
checkpoint folder and the TensorBoard logger pointing into the run folder). A run is what
`python -m src.cli fit --config RUN/config.yaml` then `python -m src.cli test --config RUN/config.yaml
--ckpt_path RUN/checkpoints/last.ckpt` do, done in one process by `run-one`, which also writes
`facts.json` (trainable and total parameters per part, image tokens per view) from the built model,
and `DONE` at the end; a run with `DONE` is skipped when the sweep runs again, a run that stopped
part-way resumes from its `last.ckpt` (or the `hpc_ckpt_N.ckpt` a SLURM requeue wrote).

Paths in a spec (base, out, slurm) and inside the configs are relative to the directory the command
runs from (the repository root), as for `python -m src.cli`; the sweep records that directory and
every run starts there.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import importlib
import itertools
import json
import math
import os
import random as random_module
import re
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

SPEC_KEYS = ("base", "overrides", "grid", "random", "out", "test", "slurm")
DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform", "choice")
SEED_KEYS = ("seed_everything",)  # plus any key whose last part is `seed`: the runs a plot averages over
RUNS_FILE = "runs.txt"  # one run folder per line; line i (from 0) is SLURM array task i
MANIFEST = "sweep.json"
RUN_FILE = "run.json"  # per run: its name, swept values, whether it tests, the directory it runs from
DONE, FIT_DONE, FAILED = "DONE", "FIT_DONE", "FAILED"
FACTS = "facts.json"
LOG = "run.log"
LOGGER_NAME = "logs"  # TensorBoard: RUN/logs/fit and RUN/logs/test
COLUMNS = (
    "status",
    "steps",
    "train_loss",
    "val_loss",
    "test_accuracy",
    "tokens_per_s",
    "trainable_params",
    "image_tokens_per_sample",
)
NUMERIC = COLUMNS[1:]


class SweepError(ValueError):
    """A spec that cannot be planned; the message says what to change."""


# ---- the spec ---------------------------------------------------------------------------------


@dataclass
class Sweep:
    """A parsed spec. Paths are absolute (resolved against `cwd`)."""

    base: list[Path]
    grid: dict[str, list[Any]]
    random: dict[str, Any] | None
    overrides: dict[str, Any]
    out: Path
    cwd: Path
    test: bool | None = None  # None: test when the config has data.test_shards
    slurm: str | dict | None = None
    spec_path: Path | None = None


@dataclass(frozen=True)
class Run:
    """One point of the sweep."""

    index: int
    name: str
    values: dict[str, Any]  # swept key -> the value that replaces it
    labels: dict[str, str]  # column label -> the value as written in names and tables
    path: Path


def _absolute(path: str | Path, cwd: Path) -> Path:
    path = Path(os.path.expanduser(str(path)))
    return path if path.is_absolute() else (cwd / path)


def load_spec(spec: str | Path | Mapping, out: str | Path | None = None, cwd: str | Path | None = None) -> Sweep:
    """A spec file (or its dict) -> `Sweep`; `out` replaces the spec's `out`."""
    cwd = Path(cwd or os.getcwd()).resolve()
    spec_path = None
    if isinstance(spec, (str, Path)):
        spec_path = _absolute(spec, cwd).resolve()
        if not spec_path.is_file():
            raise SweepError(f"no sweep spec at {spec_path}")
        raw = OmegaConf.to_container(OmegaConf.load(spec_path), resolve=False)
    else:
        raw = OmegaConf.to_container(OmegaConf.create(dict(spec)), resolve=False)
    if not isinstance(raw, dict):
        raise SweepError(f"a sweep spec is a mapping with {', '.join(SPEC_KEYS)}")
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise SweepError(f"unknown sweep spec key(s) {unknown}; a spec has {', '.join(SPEC_KEYS)}")
    base = raw.get("base")
    if not base:
        raise SweepError("a sweep spec needs `base`: the config file(s) every run starts from")
    base = [base] if isinstance(base, str) else list(base)
    base_paths = [_absolute(b, cwd) for b in base]
    missing = [str(p) for p in base_paths if not p.is_file()]
    if missing:
        raise SweepError(f"base config(s) not found: {missing} (paths are relative to {cwd})")
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict):
        raise SweepError("`grid` maps config keys (dotted) to lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"grid key {key!r} needs a non-empty list of values, got {values!r}")
    rnd = raw.get("random")
    if rnd is not None:
        _check_random(rnd)
    if not grid and not rnd:
        raise SweepError("a sweep spec needs `grid` or `random` (or both)")
    both = sorted(set(grid) & set((rnd or {}).get("space", {})))
    if both:
        raise SweepError(f"key(s) {both} are both in grid and random.space; sweep each key one way")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise SweepError("`overrides` is a mapping of config keys (nested or dotted) to values")
    out_value = out if out is not None else raw.get("out")
    if not out_value:
        raise SweepError("a sweep spec needs `out`, the sweep's folder (or pass --out)")
    test = raw.get("test", "auto")
    if test not in ("auto", True, False, None):
        raise SweepError(f"`test` is auto, true or false, got {test!r}")
    return Sweep(
        base=base_paths,
        grid={str(k): list(v) for k, v in grid.items()},
        random=rnd,
        overrides=overrides,
        out=_absolute(out_value, cwd),
        cwd=cwd,
        test=None if test in ("auto", None) else bool(test),
        slurm=raw.get("slurm"),
        spec_path=spec_path,
    )


def _check_random(rnd: object) -> None:
    if not isinstance(rnd, dict) or set(rnd) - {"n", "seed", "space"}:
        raise SweepError(
            "`random` is {n: draws, seed: int, space: {key: {uniform|log_uniform|int_uniform|choice: ...}}}"
        )
    n = rnd.get("n")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SweepError(f"random.n must be a positive integer, got {n!r}")
    space = rnd.get("space")
    if not isinstance(space, dict) or not space:
        raise SweepError("random.space maps config keys to a distribution, e.g. {log_uniform: [1.0e-5, 1.0e-3]}")
    for key, dist in space.items():
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            raise SweepError(f"random.space.{key} must be one of {{{' | '.join(DISTRIBUTIONS)}: ...}}, got {dist!r}")
        kind, arg = next(iter(dist.items()))
        if kind == "choice":
            if not isinstance(arg, list) or not arg:
                raise SweepError(f"random.space.{key}.choice needs a non-empty list")
            continue
        if not isinstance(arg, list) or len(arg) != 2 or not all(isinstance(a, (int, float)) for a in arg):
            raise SweepError(f"random.space.{key}.{kind} needs [low, high], got {arg!r}")
        low, high = arg
        if low > high or (kind == "log_uniform" and low <= 0):
            raise SweepError(f"random.space.{key}.{kind}: need low <= high{' and low > 0' * (kind == 'log_uniform')}")


def draw(space: Mapping[str, Mapping[str, Any]], n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` draws from `space`, the same for the same (space, n, seed): keys in sorted order."""
    rng = random_module.Random(seed)
    draws = []
    for _ in range(n):
        values = {}
        for key in sorted(space):
            kind, arg = next(iter(space[key].items()))
            if kind == "uniform":
                values[key] = rng.uniform(float(arg[0]), float(arg[1]))
            elif kind == "log_uniform":
                values[key] = math.exp(rng.uniform(math.log(arg[0]), math.log(arg[1])))
            elif kind == "int_uniform":
                values[key] = rng.randint(int(arg[0]), int(arg[1]))
            else:
                values[key] = arg[rng.randrange(len(arg))]
        draws.append({key: values[key] for key in space})  # back in the spec's order
    return draws


# ---- names ------------------------------------------------------------------------------------


def is_seed(key: str) -> bool:
    """Keys whose runs are repeats of one setting (averaged in the plot and the summary)."""
    return key in SEED_KEYS or key.rsplit(".", 1)[-1] == "seed"


def column_labels(keys: Sequence[str]) -> dict[str, str]:
    """Short labels of swept keys: the last part (`model.projector` -> `projector`; `seed_everything`
    -> `seed`), or the whole dotted key where two keys would share one."""

    def short(key: str) -> str:
        return "seed" if key in SEED_KEYS else key.rsplit(".", 1)[-1]

    shorts = [short(k) for k in keys]
    return {k: (s if shorts.count(s) == 1 else k) for k, s in zip(keys, shorts, strict=True)}


def compact(value: Any) -> str:
    """A value written short: numbers as they read (floats to 3 significant digits), lists joined with
    `_`, mappings as key+value pairs."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return "_".join(compact(v) for v in value)
    if isinstance(value, dict):
        parts = []
        for k, v in value.items():
            if isinstance(v, dict):
                parts.append(compact(v))
            else:
                parts.append(f"{k}{compact(v)}")
        return "_".join(p for p in parts if p)
    return str(value)


def value_labels(values: Sequence[Any]) -> list[str]:
    """Labels of one key's values: a mapping with a `name` is its name; names that repeat get their
    other fields added (`mlp_depth1`, `mlp_depth3`); anything still equal gets its position."""
    labels = []
    for value in values:
        if isinstance(value, dict) and "name" in value:
            labels.append(str(value["name"]))
        else:
            labels.append(compact(value))
    short = list(labels)
    for i, value in enumerate(values):
        if short.count(short[i]) > 1 and isinstance(value, dict) and "name" in value:
            rest = compact({k: v for k, v in value.items() if k != "name"})
            labels[i] = f"{value['name']}_{rest}" if rest else str(value["name"])
    longer = list(labels)
    for i in range(len(labels)):
        if longer.count(longer[i]) > 1:
            labels[i] = f"{longer[i]}_{i}"
    return [safe(label) for label in labels]


def safe(text: str) -> str:
    """Filesystem-safe on every OS: letters, digits and `.+_-` kept, the rest `_`."""
    text = re.sub(r"[^A-Za-z0-9.+_-]+", "_", text).strip("._") or "_"
    return text


def plan(sweep: Sweep) -> list[Run]:
    """The sweep's runs, in a fixed order: the grid's product (first key slowest), each crossed with
    the random draws. Names come from the swept values, so they stay the same when runs are added."""
    grid_keys = list(sweep.grid)
    draws = draw(sweep.random["space"], sweep.random["n"], sweep.random.get("seed", 0)) if sweep.random else [{}]
    random_keys = list(sweep.random["space"]) if sweep.random else []
    columns = column_labels(grid_keys + random_keys)
    grid_labels = {k: value_labels(sweep.grid[k]) for k in grid_keys}
    runs: list[Run] = []
    combos = itertools.product(*(range(len(sweep.grid[k])) for k in grid_keys))
    for combo in combos:
        for drawn in draws:
            values, labels = {}, {}
            for key, i in zip(grid_keys, combo, strict=True):
                values[key] = sweep.grid[key][i]
                labels[columns[key]] = grid_labels[key][i]
            for key in random_keys:
                values[key] = drawn[key]
                labels[columns[key]] = safe(compact(drawn[key]))
            name = "-".join(f"{safe(col)}={label}" for col, label in labels.items())
            runs.append(Run(len(runs), name, values, labels, sweep.out / name))
    names = [r.name for r in runs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SweepError(f"runs with the same name {repeated}: two points of the sweep read the same")
    return runs


# ---- configs ----------------------------------------------------------------------------------


def _dotted(overrides: Mapping[str, Any]) -> DictConfig:
    """Nested or dotted keys -> one nested config."""
    conf = OmegaConf.create({})
    for key, value in overrides.items():
        OmegaConf.update(conf, str(key), value, merge=True, force_add=True)
    return conf


def _has_parent(conf: DictConfig, key: str) -> bool:
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    return not parent or OmegaConf.select(conf, parent, default=None) is not None


def base_config(sweep: Sweep) -> DictConfig:
    """The base configs merged in order, then the overrides."""
    confs = [OmegaConf.load(p) for p in sweep.base]
    merged = OmegaConf.merge(*confs, _dotted(sweep.overrides))
    assert isinstance(merged, DictConfig)
    for key in [*sweep.grid, *((sweep.random or {}).get("space") or {})]:
        if not _has_parent(merged, key):
            raise SweepError(
                f"swept key {key!r}: the base config has no {key.rsplit('.', 1)[0]!r} (a typo?); "
                "keys are dotted paths into the merged config"
            )
    return merged


def run_config(sweep: Sweep, run: Run, base: DictConfig | None = None) -> dict[str, Any]:
    """A run's resolved config: the base, its swept values (each replaces its key), then the run's
    folders: trainer.default_root_dir, every ModelCheckpoint's dirpath (RUN/checkpoints) and, unless
    the config names a logger, a TensorBoardLogger writing RUN/logs/fit."""
    conf = OmegaConf.create(OmegaConf.to_container(base if base is not None else base_config(sweep), resolve=False))
    for key, value in run.values.items():
        OmegaConf.update(conf, key, value, merge=False, force_add=True)
    try:
        plain = OmegaConf.to_container(conf, resolve=True)
    except Exception:  # interpolations only the CLI's parser can resolve: it resolves them at load
        plain = OmegaConf.to_container(conf, resolve=False)
    trainer = plain.setdefault("trainer", {}) or {}
    plain["trainer"] = trainer
    trainer["default_root_dir"] = str(run.path)
    for callback in trainer.get("callbacks") or []:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
            init = callback.setdefault("init_args", {}) or {}
            callback["init_args"] = init
            init["dirpath"] = str(run.path / "checkpoints")
    if trainer.get("logger") in (None, True):
        trainer["logger"] = _sweep_logger(run.path)
    return plain


def _sweep_logger(run_dir: Path) -> dict[str, Any]:
    return {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(run_dir), "name": LOGGER_NAME, "version": "fit"},
    }


def wants_test(sweep_test: bool | None, config: Mapping[str, Any]) -> bool:
    if sweep_test is not None:
        return sweep_test
    return bool((config.get("data") or {}).get("test_shards"))


# ---- run folders ------------------------------------------------------------------------------


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
            "sweep_logger": config["trainer"]["logger"] == _sweep_logger(run.path),
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
                args += importlib.import_module("src.launch.slurm").REQUEUE_ARGS
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


# ---- running ------------------------------------------------------------------------------------


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


def array_ranges(indices: Iterable[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> `0-2,5,7-8`, SLURM's --array syntax."""
    parts: list[str] = []
    ordered = sorted(set(indices))
    start = prev = None
    for i in [*ordered, None]:
        if i is not None and prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = i
    return ",".join(parts)


def run_slurm(
    sweep: Sweep,
    runs: Sequence[Run],
    settings_source: str | dict | None = None,
    dry_run: bool = False,
    max_parallel: int | None = None,
) -> list[str]:
    """Submits the unfinished runs as a SLURM job array through `src.launch.slurm`: task i runs line i of
    runs.txt (`python -m src.launch.sweep run-one --sweep OUT --index ${SLURM_ARRAY_TASK_ID}` on each of
    its ranks), so the array lists the unfinished indices (`0-3,6`). The job's nodes and tasks per node
    are the runs' `trainer.num_nodes` and `trainer.devices` (runs of different shapes go in one array
    each); `gpus_per_node`, when the settings leave it at 0 on a GPU run, is `devices`. `max_parallel`
    caps the tasks running at once (`--array=0-20%4`). Returns the job ids (the scripts, with `dry_run`)."""
    slurm = importlib.import_module("src.launch.slurm")
    statuses = prepare(sweep, runs)
    todo = [r for r in runs if statuses[r.name] != "done"]
    print(f"{sweep.out}: {len(runs)} runs, {len(runs) - len(todo)} done, {len(todo)} to submit")
    if not todo:
        return []
    source = settings_source if settings_source is not None else sweep.slurm
    if isinstance(source, str):
        source = str(_absolute(source, sweep.cwd))
    settings = slurm.load_settings(source)
    if settings.job_name == slurm.SlurmSettings().job_name:
        settings = dataclasses.replace(settings, job_name=safe(f"sweep-{sweep.out.name}"))
    groups: dict[tuple[Any, ...], list[Run]] = {}  # by the trainer keys the shape comes from
    for run in todo:
        trainer = OmegaConf.to_container(OmegaConf.load(run.path / "config.yaml")).get("trainer") or {}
        key = tuple(json.dumps(trainer.get(k), sort_keys=True) for k in ("num_nodes", "devices", "accelerator"))
        groups.setdefault(key, []).append(run)
    results = []
    for group in groups.values():
        nodes, devices = slurm.trainer_shape([group[0].path / "config.yaml"], [])
        accelerator = (OmegaConf.load(group[0].path / "config.yaml").get("trainer") or {}).get("accelerator")
        job_settings = dataclasses.replace(settings, nodes=nodes)
        if not settings.gpus_per_node and accelerator in ("gpu", "cuda"):
            job_settings = dataclasses.replace(job_settings, gpus_per_node=devices)
        array = array_ranges(r.index for r in group) + (f"%{max_parallel}" if max_parallel else "")
        script = slurm.render(
            job_settings,
            sweep.out,
            ["--sweep", str(sweep.out), "--index", slurm.ARRAY_TASK_ID],
            devices,
            array=array,
            command=["-m", "src.launch.sweep", "run-one"],
        )
        shape = f"{len(group)} runs, {nodes} node(s) x {devices} task(s)"
        if dry_run:
            print(f"# array {array}: {shape}\n{script}")
            results.append(script)
            continue
        job = str(slurm.submit(script, sweep.out))
        print(f"submitted job array {job}: tasks {array} ({shape}); logs {sweep.out}/slurm-{job}_<task>.out")
        with open(sweep.out / "slurm_jobs.txt", "a") as jobs:
            jobs.write(f"{job}\t{array}\t{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        results.append(job)
    return results


# ---- statistics over seeds (no scipy: the t distribution from the incomplete beta function) -------


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # fmt: skip
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` (any positive real) degrees of freedom."""
    return regularized_beta(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(probability: float, df: float) -> float:
    """The t value below which `probability` (> 0.5) of Student's t with `df` degrees of freedom lies."""
    if not 0.5 < probability < 1.0:
        raise ValueError(f"probability must be in (0.5, 1), got {probability}")
    tail = 2.0 * (1.0 - probability)
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > tail:
        high *= 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        low, high = (middle, high) if t_two_sided_p(middle, df) > tail else (low, middle)
    return (low + high) / 2.0


@dataclass(frozen=True)
class Spread:
    """Seeds of one setting: mean, sample standard deviation and the t interval of the mean."""

    n: int
    mean: float
    sd: float | None  # None below 2 seeds
    low: float | None
    high: float | None


def spread(values: Sequence[float], level: float = 0.95) -> Spread:
    """Mean ± sd and the `level` confidence interval of the mean, mean ± t(n-1) sd / sqrt(n)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return Spread(n, mean, None, None, None)
    sd = statistics.stdev(values)
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return Spread(n, mean, sd, mean - half, mean + half)


def welch(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Welch's t-test, two-sided p-value (None with fewer than 2 seeds on a side). Equal values on both
    sides with no spread give 1; different values with no spread at all give 0."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    if va + vb == 0:
        return 1.0 if diff == 0 else 0.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return t_two_sided_p(diff / math.sqrt(va + vb), df)


SIGNIFICANCE = 0.05  # Welch's p below this: a difference larger than the seed noise


# ---- collecting ---------------------------------------------------------------------------------


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of every TensorBoard event file under a run, as (step, value) sorted by step; where
    a resumed run logged a step again, the later write wins."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[str, list[tuple[float, int, float]]] = {}
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            points.setdefault(tag, []).extend((e.wall_time, e.step, e.value) for e in acc.Scalars(tag))
    scalars = {}
    for tag, items in points.items():
        by_step: dict[int, float] = {}
        for _, step, value in sorted(items):
            by_step[step] = value
        scalars[tag] = sorted(by_step.items())
    return scalars


def _last(scalars: Mapping[str, list[tuple[int, float]]], tag: str) -> float | None:
    return scalars[tag][-1][1] if scalars.get(tag) else None


@dataclass
class Result:
    name: str
    labels: dict[str, str]
    values: dict[str, Any] = field(default_factory=dict)  # COLUMNS -> value
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    bench: dict[str, float] = field(default_factory=dict)  # bench/<name>/<row>/<column> -> value


BENCH_PREFIX = "bench/"
BENCH_COUNTS = ("/failures", "/missing")  # logged beside the scores; not columns
SCORE_PREFIXES = (BENCH_PREFIX, "test/mc_accuracy_")  # benchmarks, and the test set's accuracy per question type


def bench_scores(run_dir: Path, scalars: Mapping[str, list[tuple[int, float]]]) -> dict[str, float]:
    """A run's benchmark numbers: the last logged `bench/*` scalar of each tag (BenchmarkEval) and the
    test set's accuracy per question type (`test/mc_accuracy_<type>`), then
    every `report.json` of `python -m src.eval score` under the run folder (`--out RUN/eval/<name>`),
    whose numbers replace the logged ones of the same name: a scored report is of the final model on
    the questions it names, the logged ones of a subset during training."""
    scores = {tag: points[-1][1] for tag, points in scalars.items()
              if tag.startswith(SCORE_PREFIXES) and points and not tag.endswith(BENCH_COUNTS)}  # fmt: skip
    for path in sorted(run_dir.rglob("report.json")) if run_dir.is_dir() else []:
        try:
            report = json.loads(path.read_text())
        except ValueError:
            print(f"warning: {path} is not JSON; left out")
            continue
        if not isinstance(report, dict) or "benchmark" not in report or "step" in report:
            continue  # not a score report (BenchmarkEval's own files carry a step: their numbers are logged)
        for row, values in (report.get("rows") or {}).items():
            for column, value in (values or {}).items():
                if isinstance(value, (int, float)):
                    scores["/".join(p for p in ("bench", report["benchmark"], row, column) if p)] = float(value)
    return scores


def run_result(run_dir: Path, name: str, labels: dict[str, str]) -> Result:
    """One row: the run's status and, from its event files and facts.json, its numbers.

    train_loss and val_loss are the last logged `train/loss` and `val/loss`; test_accuracy is
    `test/mc_accuracy`; tokens_per_s the median of `perf/tokens_per_s` (the median leaves out the
    first, warm-up step); image_tokens_per_sample the tokens per image view times the views per
    sample (`perf/images_per_s` over `perf/samples_per_s`)."""
    scalars = read_scalars(run_dir) if run_dir.is_dir() else {}
    facts = json.loads((run_dir / FACTS).read_text()) if (run_dir / FACTS).is_file() else {}
    tokens = [v for _, v in scalars.get("perf/tokens_per_s", [])]
    per_sample = None
    images = dict(scalars.get("perf/images_per_s", []))
    samples = dict(scalars.get("perf/samples_per_s", []))
    ratios = [images[s] / samples[s] for s in images if samples.get(s)]
    if facts.get("image_tokens_per_view") is not None and ratios:
        per_sample = facts["image_tokens_per_view"] * statistics.fmean(ratios)
    train = scalars.get("train/loss", [])
    values = {
        "status": status(run_dir),
        "steps": (train[-1][0] + 1) if train else None,
        "train_loss": _last(scalars, "train/loss"),
        "val_loss": _last(scalars, "val/loss"),
        "test_accuracy": _last(scalars, "test/mc_accuracy"),
        "tokens_per_s": statistics.median(tokens) if tokens else None,
        "trainable_params": facts.get("trainable_params"),
        "image_tokens_per_sample": per_sample,
    }
    curves = {tag: scalars[tag] for tag in ("train/loss", "val/loss") if tag in scalars}
    return Result(name, labels, values, curves, bench_scores(run_dir, scalars))


def _format(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column.startswith(BENCH_PREFIX):
        return f"{value:.2f}"
    if column.startswith(SCORE_PREFIXES):
        return f"{value:.3f}"
    if column == "trainable_params":
        return f"{int(value):,}"
    if column == "steps":
        return str(int(value))
    if column in ("train_loss", "val_loss"):
        return f"{value:.4f}"
    if column == "test_accuracy":
        return f"{value:.3f}"
    if column in ("tokens_per_s", "image_tokens_per_sample"):
        return f"{value:.1f}"
    return str(value)


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def collect(
    target: str | Path, out: str | Path | None = None, plot: bool = True, bench: str | None = None
) -> dict[str, Path]:
    """Reads every run of a sweep (a spec file, or the sweep's folder) and writes `results.csv`,
    `results.md` (one row per run), `summary.md` (per setting over its seeds: mean ± sd, the 95%
    confidence interval, and which differences exceed the seed noise), `loss_curves.png` and
    `scores.png` (means with their intervals) into the sweep's folder. `bench`, a regular
    expression, keeps the benchmark columns it finds in (default: all). Returns the files written."""
    target = Path(target)
    if target.is_file():
        sweep = load_spec(target, out=out)
        folder = sweep.out
    else:
        folder = Path(out) if out else target
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise SweepError(f"no {MANIFEST} in {folder}: plan or run the sweep first")
    manifest = json.loads(manifest_path.read_text())
    columns, seeds = manifest["columns"], manifest["seeds"]
    results = [run_result(Path(r["dir"]), r["name"], r["labels"]) for r in manifest["runs"]]
    benches = bench_columns(results, bench)
    header = ["run", *columns, *COLUMNS, *benches]
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in results:
            writer.writerow(
                [
                    r.name,
                    *(r.labels[c] for c in columns),
                    *("" if r.values[c] is None else r.values[c] for c in COLUMNS),
                    *(r.bench.get(c, "") for c in benches),
                ]
            )
    rows = [
        [r.name, *(r.labels[c] for c in columns), *(_format(c, r.values[c]) for c in COLUMNS),
         *(_format(c, r.bench.get(c)) for c in benches)]
        for r in results
    ]  # fmt: skip
    (folder / "results.md").write_text(_markdown(header, rows))
    (folder / "summary.md").write_text(summary(results, columns, seeds, benches))
    written = {"csv": folder / "results.csv", "markdown": folder / "results.md", "summary": folder / "summary.md"}
    if plot:
        written["plot"] = plot_curves(results, columns, seeds, folder / "loss_curves.png")
        scores = plot_scores(results, columns, seeds, benches, folder / "scores.png")
        if scores is not None:
            written["scores"] = scores
    done = sum(r.values["status"] == "done" for r in results)
    print(f"{folder}: {done} of {len(results)} runs done; wrote " + ", ".join(p.name for p in written.values()))
    return written


def bench_columns(results: Sequence[Result], pattern: str | None = None) -> list[str]:
    """The benchmark columns of any run, in the order first seen, those matching `pattern` only."""
    try:
        wanted = re.compile(pattern) if pattern else None
    except re.error as error:
        raise SweepError(f"--bench {pattern!r} is not a regular expression: {error}") from None
    seen: dict[str, None] = {}
    for r in results:
        for key in r.bench:
            if wanted is None or wanted.search(key):
                seen.setdefault(key, None)
    return list(seen)


def _groups(results: Sequence[Result], columns: Sequence[str], seeds: Sequence[str]) -> dict[str, list[Result]]:
    """Runs that differ only in their seed(s), keyed by the other swept values."""
    groups: dict[str, list[Result]] = {}
    for r in results:
        key = "-".join(f"{c}={r.labels[c]}" for c in columns if c not in seeds) or "all"
        groups.setdefault(key, []).append(r)
    return groups


SUMMARY_METRICS = ("train_loss", "val_loss", "test_accuracy", "tokens_per_s", "trainable_params",
                   "image_tokens_per_sample")  # fmt: skip
LOWER_IS_BETTER = ("train_loss", "val_loss")  # every other compared column: higher is better
NOT_COMPARED = ("tokens_per_s", "trainable_params", "image_tokens_per_sample")  # facts, not outcomes


def _value(r: Result, metric: str) -> float | None:
    return r.bench.get(metric) if metric.startswith(SCORE_PREFIXES) else r.values.get(metric)


def setting_values(results: Sequence[Result], columns: Sequence[str], seeds: Sequence[str],
                   metrics: Sequence[str]) -> dict[str, dict[str, list[float]]]:  # fmt: skip
    """Per setting, per metric: the values of its finished runs (one per seed)."""
    table: dict[str, dict[str, list[float]]] = {}
    for key, group in _groups(results, columns, seeds).items():
        done = [r for r in group if r.values["status"] == "done"]
        table[key] = {m: [float(v) for r in done if (v := _value(r, m)) is not None] for m in metrics}
    return table


def separations(values: Mapping[str, Mapping[str, list[float]]], metric: str) -> tuple[str | None, dict[str, float]]:
    """The best setting of `metric` (highest mean; lowest for a loss) and Welch's p of each other
    setting against it (settings with fewer than 2 seeds are not tested)."""
    means = {key: statistics.fmean(v[metric]) for key, v in values.items() if v[metric]}
    if not means:
        return None, {}
    pick = min if metric in LOWER_IS_BETTER else max
    best = pick(means, key=lambda k: means[k])
    tests = {key: welch(values[key][metric], values[best][metric]) for key in means if key != best}
    return best, {key: p for key, p in tests.items() if p is not None}


def summary(
    results: Sequence[Result], columns: Sequence[str], seeds: Sequence[str], benches: Sequence[str] = ()
) -> str:
    """Per setting, over its finished runs: mean ± sd and [the 95% t interval of the mean]; the
    column's best setting is in bold, and a setting whose difference from it is larger than the seed
    noise (Welch's t-test, p < 0.05) is marked `*`. Then the settings' pairs that differ so."""
    metrics = [*SUMMARY_METRICS, *benches]
    values = setting_values(results, columns, seeds, metrics)
    groups = _groups(results, columns, seeds)
    compared = [m for m in metrics if m not in NOT_COMPARED]
    verdicts = {m: separations(values, m) for m in compared}
    rows = []
    for key, group in groups.items():
        done = sum(r.values["status"] == "done" for r in group)
        row = [key, f"{done}/{len(group)}"]
        for m in metrics:
            xs = values[key][m]
            if not xs:
                row.append("")
                continue
            s = spread(xs)
            cell = _format(m, s.mean)
            if s.sd is not None:
                cell += f" ± {_format(m, s.sd)} [{_format(m, s.low)}, {_format(m, s.high)}]"
            best, tests = verdicts.get(m, (None, {}))
            if key == best and len(values) > 1:
                cell = f"**{cell}**"
            elif tests.get(key) is not None and tests[key] < SIGNIFICANCE:
                cell += " *"
            row.append(cell)
        rows.append(row)
    text = _markdown(["setting", "runs done", *metrics], rows)
    text += (
        "\nmean ± sd [95% confidence interval of the mean: mean ± t(0.975, n-1) sd / sqrt(n)] over the seeds of "
        "each setting. **bold**: the column's best mean (lowest for losses); `*`: Welch's two-sided t-test "
        f"against the best gives p < {SIGNIFICANCE} (a difference larger than the seed noise). Settings with "
        "one seed are not tested.\n"
    )
    lines = []
    for m in compared:
        keys = [k for k in values if len(values[k][m]) >= 2]
        for i, a in enumerate(keys):
            for b in keys[i + 1 :]:
                p = welch(values[a][m], values[b][m])
                if p is not None and p < SIGNIFICANCE:
                    high, low = (a, b) if statistics.fmean(values[a][m]) > statistics.fmean(values[b][m]) else (b, a)
                    lines.append(f"- {m}: {high} > {low} (Welch p = {p:.3g})")
    text += "\nDifferences larger than the seed noise (every pair of settings, p < 0.05):\n\n"
    text += ("\n".join(lines) if lines else "- none") + "\n"
    return text


def plot_curves(results: Sequence[Result], columns: Sequence[str], seeds: Sequence[str], path: Path) -> Path:
    """Train (and val) loss against step, one line per setting (the mean over its seeds) with the band
    from the lowest to the highest seed."""
    try:
        import matplotlib
    except ImportError as error:
        raise SweepError("the loss plot needs matplotlib: pip install matplotlib") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    tags = [t for t in ("train/loss", "val/loss") if any(t in r.curves for r in results)] or ["train/loss"]
    fig, axes = plt.subplots(1, len(tags), figsize=(6.5 * len(tags), 4.5), squeeze=False)
    groups = _groups(results, columns, seeds)
    colours = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    for ax, tag in zip(axes[0], tags, strict=True):
        for i, (key, group) in enumerate(groups.items()):
            by_step: dict[int, list[float]] = {}
            for r in group:
                for step, value in r.curves.get(tag, []):
                    by_step.setdefault(step, []).append(value)
            if not by_step:
                continue
            steps = sorted(by_step)
            xs = [s + 1 for s in steps]  # Lightning logs step k's loss at k: after k + 1 optimizer steps
            mean = [statistics.fmean(by_step[s]) for s in steps]
            colour = colours(i % colours.N)
            n = max(len(v) for v in by_step.values())
            ax.plot(xs, mean, color=colour, label=f"{key} (n={n})", marker="o" if len(steps) < 20 else None, ms=3)
            if n > 1:
                ax.fill_between(
                    xs, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps], color=colour, alpha=0.2
                )
        ax.set_title(f"{tag}: mean over seeds, band = min to max")
        ax.set_xlabel("optimizer steps")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(tag)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_scores(
    results: Sequence[Result],
    columns: Sequence[str],
    seeds: Sequence[str],
    benches: Sequence[str],
    path: Path,
    most: int = 12,
) -> Path | None:
    """One panel per compared metric with values (val_loss, test_accuracy, then the benchmark columns,
    `most` panels at most): each setting's mean over its seeds with its 95% confidence interval as
    error bars, the seeds as dots. None when no run has any of them."""
    metrics = [m for m in ("val_loss", "test_accuracy", *benches)]
    values = setting_values(results, columns, seeds, metrics)
    metrics = [m for m in metrics if any(values[k][m] for k in values)][:most]
    if not metrics:
        return None
    try:
        import matplotlib
    except ImportError as error:
        raise SweepError("the plots need matplotlib: pip install matplotlib") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = min(3, len(metrics))
    height = math.ceil(len(metrics) / width)
    keys = list(values)
    fig, axes = plt.subplots(height, width, figsize=(max(4.5, 1.1 * len(keys) + 2) * width, 3.8 * height),
                             squeeze=False)  # fmt: skip
    for ax, m in zip(axes.flat, metrics, strict=False):
        for i, key in enumerate(keys):
            xs = values[key][m]
            if not xs:
                continue
            s = spread(xs)
            error = [[s.mean - s.low], [s.high - s.mean]] if s.sd is not None else None
            ax.errorbar([i], [s.mean], yerr=error, fmt="o", color="C0", capsize=5, ms=6)
            ax.scatter([i + 0.15] * len(xs), xs, color="0.5", s=10, zorder=3)
        ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize=7)
        ax.set_title(m, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.suptitle("mean over seeds, error bars: 95% confidence interval (t), dots: seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- the command line ---------------------------------------------------------------------------


def _print_plan(sweep: Sweep, runs: Sequence[Run]) -> None:
    base = base_config(sweep)
    print(f"sweep {sweep.spec_path or ''} -> {sweep.out}: {len(runs)} runs")
    for run in runs:
        config = run_config(sweep, run, base)
        tested = "fit+test" if wants_test(sweep.test, config) else "fit"
        print(f"  {run.index:>3}  {run.name:<50} {status(run.path):<8} {tested}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.launch.sweep", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="list the runs and their status")
    p.add_argument("spec")
    p.add_argument("--out", help="the sweep's folder (default: the spec's `out`)")
    p.add_argument("--write", action="store_true", help="also write the run folders and configs")
    p = sub.add_parser("run", help="run the unfinished runs: here (--local) or as a SLURM job array (--slurm)")
    p.add_argument("spec")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="one after another on this machine")
    where.add_argument("--slurm", action="store_true", help="one job array through src.launch.slurm")
    p.add_argument("--slurm-config", help="SLURM settings (YAML) for src.launch.slurm.load_settings")
    p.add_argument("--max-parallel", type=int, help="--slurm: array tasks running at once (--array=...%%N)")
    p.add_argument("--out", help="the sweep's folder (default: the spec's `out`)")
    p.add_argument("--dry-run", action="store_true", help="write the run folders, print what would run")
    p.add_argument("--stream", action="store_true", help="--local: runs' output here, not in RUN/run.log")
    p = sub.add_parser("run-one", help="run line INDEX of SWEEP/runs.txt in this process (what array tasks do)")
    p.add_argument("--sweep", required=True, help="the sweep's folder")
    p.add_argument("--index", required=True, type=int)
    p = sub.add_parser("collect", help="results.csv/.md, summary.md, loss_curves.png and scores.png of a sweep")
    p.add_argument("target", help="a sweep spec, or a sweep's folder")
    p.add_argument("--out", help="the sweep's folder when a spec is given (default: the spec's `out`)")
    p.add_argument("--bench", help="regular expression: the benchmark columns kept (default: all), e.g. '/all/'")
    p.add_argument("--no-plot", action="store_true", help="tables only (no matplotlib needed)")
    args = parser.parse_args(argv)
    try:
        if args.command == "run-one":
            run_one(args.sweep, args.index)
            return 0
        if args.command == "collect":
            collect(args.target, out=args.out, plot=not args.no_plot, bench=args.bench)
            return 0
        sweep = load_spec(args.spec, out=args.out)
        runs = plan(sweep)
        if args.command == "plan":
            if args.write:
                prepare(sweep, runs)
            _print_plan(sweep, runs)
            return 0
        if args.local:
            failed = run_local(sweep, runs, dry_run=args.dry_run, stream=args.stream)
            if failed:
                print(f"{failed} run(s) failed; run the sweep again to retry them")
            return 1 if failed else 0
        if args.max_parallel is not None and args.max_parallel < 1:
            raise SweepError("--max-parallel must be at least 1")
        run_slurm(sweep, runs, args.slurm_config, dry_run=args.dry_run, max_parallel=args.max_parallel)
        return 0
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
