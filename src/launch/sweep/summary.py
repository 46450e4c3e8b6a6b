"""The per-setting summary over seeds: mean ± sd, the 95% confidence interval of the mean, the best
setting of each column, and which differences are larger than the seed noise (Welch's t-test)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

from src.launch.sweep.results import SCORE_PREFIXES, Result, format_value, markdown_table
from src.launch.sweep.stats import SIGNIFICANCE, spread, welch


def setting_groups(results: Sequence[Result], columns: Sequence[str], seeds: Sequence[str]) -> dict[str, list[Result]]:
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


def metric_value(r: Result, metric: str) -> float | None:
    return r.bench.get(metric) if metric.startswith(SCORE_PREFIXES) else r.values.get(metric)


def setting_values(results: Sequence[Result], columns: Sequence[str], seeds: Sequence[str],
                   metrics: Sequence[str]) -> dict[str, dict[str, list[float]]]:  # fmt: skip
    """Per setting, per metric: the values of its finished runs (one per seed)."""
    table: dict[str, dict[str, list[float]]] = {}
    for key, group in setting_groups(results, columns, seeds).items():
        done = [r for r in group if r.values["status"] == "done"]
        table[key] = {m: [float(v) for r in done if (v := metric_value(r, m)) is not None] for m in metrics}
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
    groups = setting_groups(results, columns, seeds)
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
            cell = format_value(m, s.mean)
            if s.sd is not None:
                cell += f" ± {format_value(m, s.sd)} [{format_value(m, s.low)}, {format_value(m, s.high)}]"
            best, tests = verdicts.get(m, (None, {}))
            if key == best and len(values) > 1:
                cell = f"**{cell}**"
            elif tests.get(key) is not None and tests[key] < SIGNIFICANCE:
                cell += " *"
            row.append(cell)
        rows.append(row)
    text = markdown_table(["setting", "runs done", *metrics], rows)
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
