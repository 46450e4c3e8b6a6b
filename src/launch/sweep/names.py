"""Names of runs, columns and values: short, stable (the same values give the same folder when runs are
added) and safe on every filesystem."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

SEED_KEYS = ("seed_everything",)  # plus any key whose last part is `seed`: the runs a plot averages over


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
