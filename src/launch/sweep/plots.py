"""The sweep's plots (matplotlib, imported only here): loss curves per setting with the band over seeds,
and each compared metric's mean with its 95% confidence interval."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from src.launch.sweep.results import Result
from src.launch.sweep.spec import SweepError
from src.launch.sweep.stats import spread
from src.launch.sweep.summary import setting_groups, setting_values


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
    groups = setting_groups(results, columns, seeds)
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
