"""One run's row of the results: its status, its TensorBoard scalars, its facts and its benchmark
scores, and how each column is written in the tables."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from src.launch.sweep.folders import FACTS, status

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
    first, warm-up step); image_tokens_per_sample the mean of `perf/image_tokens_per_sample`, the
    placeholders the batches held (right for anyres unpad, whose count follows each image's size), or,
    for runs logged before that tag existed, the tokens per view times the views per sample
    (`perf/images_per_s` over `perf/samples_per_s`)."""
    scalars = read_scalars(run_dir) if run_dir.is_dir() else {}
    facts = json.loads((run_dir / FACTS).read_text()) if (run_dir / FACTS).is_file() else {}
    tokens = [v for _, v in scalars.get("perf/tokens_per_s", [])]
    per_sample = None
    images = dict(scalars.get("perf/images_per_s", []))
    samples = dict(scalars.get("perf/samples_per_s", []))
    ratios = [images[s] / samples[s] for s in images if samples.get(s)]
    if facts.get("image_tokens_per_view") is not None and ratios:
        per_sample = facts["image_tokens_per_view"] * statistics.fmean(ratios)
    counted = [v for _, v in scalars.get("perf/image_tokens_per_sample", [])]
    if counted:
        per_sample = statistics.fmean(counted)
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


def format_value(column: str, value: Any) -> str:
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


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
