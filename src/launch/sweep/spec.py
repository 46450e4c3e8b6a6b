"""The sweep spec: one YAML file (or mapping) -> a checked `Sweep`, and the random search's draws.
See docs/sweeps.md for the keys; every error says what to change."""

from __future__ import annotations

import math
import os
import random as random_module
from argparse import ArgumentError
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ArgumentParser
from omegaconf import OmegaConf

from src.core.cli_config import one_line
from src.core.config_files import ConfigFileError, config_chain

SPEC_KEYS = ("base", "overrides", "grid", "random", "out", "test", "slurm")
DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform", "choice")


class SweepError(ValueError):
    """A spec that cannot be planned; the message says what to change."""


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


@dataclass
class SweepSpec:
    """A sweep spec's keys, as jsonargparse parses them (typed and documented; docs/sweeps.md).

    Args:
        base: the config file(s) every run starts from, merged in order (like repeated `--config`); a
            config that names its own `base:` brings its bases, as `python -m src.cli --config` does.
        overrides: merged into every run (nested or dotted keys).
        grid: dotted config key -> the values it takes; the runs are their cartesian product.
        random: `{n: draws, seed: int, space: {key: {uniform|log_uniform|int_uniform|choice: ...}}}`,
            crossed with the grid.
        out: the sweep's folder.
        test: test each run after fit: auto (when data.test_shards is set), true or false.
        slurm: settings for `run --slurm`: a YAML file or the settings inline (`src.launch.slurm`).
    """

    base: str | list[str] | None = None
    # plain `dict`: the values stay as written (a `dict[str, Any]` would have jsonargparse import and
    # expand every `class_path` in them)
    overrides: dict | None = None
    grid: dict | None = None
    random: dict | None = None
    out: str | None = None
    test: bool | Literal["auto"] | None = "auto"
    slurm: str | dict | None = None


def spec_parser() -> ArgumentParser:
    """jsonargparse's parser of `SweepSpec`, the one the training CLI's configs go through."""
    parser = ArgumentParser(prog="sweep spec", exit_on_error=False)
    parser.add_class_arguments(SweepSpec, None, fail_untyped=True)
    return parser


def check_spec(raw: Mapping[str, Any], where: str) -> None:
    """Unknown keys and wrong types, as jsonargparse reports them, in one line naming the key."""
    unknown = sorted(str(key) for key in raw if key not in SPEC_KEYS)
    try:
        spec_parser().parse_object(dict(raw))
        if unknown:  # jsonargparse lets an empty mapping under an unknown key pass
            raise ArgumentError(None, f"Option {unknown[0]!r} is not accepted")
    except ArgumentError as error:
        message = f"{where}: {one_line(error)}"
        if unknown:
            message += f" (unknown sweep spec key); a sweep spec has {', '.join(SPEC_KEYS)}"
        raise SweepError(message) from None


def absolute_path(path: str | Path, cwd: Path) -> Path:
    path = Path(os.path.expanduser(str(path)))
    return path if path.is_absolute() else (cwd / path)


def load_spec(spec: str | Path | Mapping, out: str | Path | None = None, cwd: str | Path | None = None) -> Sweep:
    """A spec file (or its dict) -> `Sweep`; `out` replaces the spec's `out`."""
    cwd = Path(cwd or os.getcwd()).resolve()
    spec_path = None
    if isinstance(spec, (str, Path)):
        spec_path = absolute_path(spec, cwd).resolve()
        if not spec_path.is_file():
            raise SweepError(f"no sweep spec at {spec_path}")
        raw = OmegaConf.to_container(OmegaConf.load(spec_path), resolve=False)
    else:
        raw = OmegaConf.to_container(OmegaConf.create(dict(spec)), resolve=False)
    if not isinstance(raw, dict):
        raise SweepError(f"a sweep spec is a mapping with {', '.join(SPEC_KEYS)}")
    check_spec(raw, str(spec_path or "the sweep spec"))
    base = raw.get("base")
    if not base:
        raise SweepError("a sweep spec needs `base`: the config file(s) every run starts from")
    base = [base] if isinstance(base, str) else list(base)
    base_paths = [absolute_path(b, cwd) for b in base]
    missing = [str(p) for p in base_paths if not p.is_file()]
    if missing:
        raise SweepError(f"base config(s) not found: {missing} (paths are relative to {cwd})")
    for path in base_paths:  # a config's own `base:` (relative to its folder), followed now: errors before planning
        try:
            config_chain(path)
        except ConfigFileError as error:
            raise SweepError(str(error)) from None
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
        out=absolute_path(out_value, cwd),
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


def dump_spec(sweep: Sweep) -> str:
    """The spec as it was read (paths made absolute, `--out` applied), as YAML: `--print_config`."""
    spec = {
        "base": [str(p) for p in sweep.base],
        "overrides": sweep.overrides,
        "grid": sweep.grid,
        "random": sweep.random,
        "out": str(sweep.out),
        "test": "auto" if sweep.test is None else sweep.test,
        "slurm": sweep.slurm,
    }
    parser = spec_parser()
    return parser.dump(parser.parse_object(spec), skip_none=False)
