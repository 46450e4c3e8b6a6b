"""A sweep's runs (the grid crossed with the random draws, in a fixed order) and each run's resolved
config: the base configs, the overrides, the run's swept values and its own folders."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src.core.config_files import ConfigFileError, load_merged
from src.launch.sweep.names import column_labels, compact, safe, value_labels
from src.launch.sweep.spec import Sweep, SweepError, draw

LOGGER_NAME = "logs"  # TensorBoard: RUN/logs/fit and RUN/logs/test


@dataclass(frozen=True)
class Run:
    """One point of the sweep."""

    index: int
    name: str
    values: dict[str, Any]  # swept key -> the value that replaces it
    labels: dict[str, str]  # column label -> the value as written in names and tables
    path: Path


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
    """The base configs merged in order, each expanded by its own `base:` as `src.cli` expands a `--config`
    (src/core/config_files.py), then the overrides."""
    try:
        merged = OmegaConf.merge(load_merged(sweep.base), _dotted(sweep.overrides))
    except ConfigFileError as error:
        raise SweepError(str(error)) from None
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
        trainer["logger"] = sweep_logger(run.path)
    return plain


def sweep_logger(run_dir: Path) -> dict[str, Any]:
    return {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(run_dir), "name": LOGGER_NAME, "version": "fit"},
    }


def wants_test(sweep_test: bool | None, config: Mapping[str, Any]) -> bool:
    if sweep_test is not None:
        return sweep_test
    return bool((config.get("data") or {}).get("test_shards"))
