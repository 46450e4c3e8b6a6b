"""Collecting a sweep: every run's row into `results.csv` / `results.md`, the per-setting `summary.md`,
and the plots, in the sweep's folder."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path

from src.launch.sweep.folders import MANIFEST
from src.launch.sweep.plots import plot_curves, plot_scores
from src.launch.sweep.results import COLUMNS, Result, format_value, markdown_table, run_result
from src.launch.sweep.spec import SweepError, load_spec
from src.launch.sweep.summary import summary


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
        [r.name, *(r.labels[c] for c in columns), *(format_value(c, r.values[c]) for c in COLUMNS),
         *(format_value(c, r.bench.get(c)) for c in benches)]
        for r in results
    ]  # fmt: skip
    (folder / "results.md").write_text(markdown_table(header, rows))
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
