"""The benchmarks' metrics: torchmetrics `Metric`s exact across processes.

Every metric keeps one entry per question in states concatenated over ranks
(`dist_reduce_fx="cat"`), and computes its numbers from all of them at the end, so an
N-process run gives the single-process numbers exactly: no averaging of averages, and the
pairs (MME) or rotations (MMBench) of one question may be scored on different ranks. Group
names are fixed when the metric is built (from the release), so a group index means the same
on every rank. Scores are float64; ids and indices stay below 2**24, so they survive the
float32 state torchmetrics gives a rank that saw nothing.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torchmetrics import Metric

NAN = float("nan")


class RowsMetric(Metric):
    """A table of per-question columns (`fields`), each a concatenated state."""

    full_state_update = False
    fields: tuple[str, ...] = ()

    def __init__(self, groups: list[str], **kwargs) -> None:
        super().__init__(**kwargs)
        if len(set(groups)) != len(groups):
            raise ValueError(f"group names must be unique, got {groups}")
        self.groups = list(groups)
        for name in self.fields:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def group_index(self, names: list[str]) -> torch.Tensor:
        unknown = sorted(set(names) - set(self.groups))
        if unknown:
            raise ValueError(f"unknown groups {unknown}; this metric has {self.groups}")
        return torch.tensor([self.groups.index(name) for name in names], dtype=torch.float64)

    def append(self, **columns: torch.Tensor | list) -> None:
        tensors = {name: torch.as_tensor(columns[name], dtype=torch.float64) for name in self.fields}
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1 or any(t.dim() != 1 for t in tensors.values()):
            raise ValueError(f"{type(self).__name__}.update needs 1-D columns of one length, got {lengths}")
        for name, tensor in tensors.items():
            getattr(self, name).append(tensor.to(self.device))

    def column(self, name: str) -> torch.Tensor:
        state = getattr(self, name)
        if isinstance(state, torch.Tensor):
            return state.to(torch.float64)
        return torch.cat(state).to(torch.float64) if state else torch.zeros(0, dtype=torch.float64)

    def per_group(self) -> list[tuple[str, torch.Tensor]]:
        """(group name, boolean row mask) of each group, then `all`."""
        group = self.column("group").long()
        return [(name, group == index) for index, name in enumerate(self.groups)] + [
            ("all", torch.ones_like(group, dtype=torch.bool))
        ]


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, 0 for an empty denominator (lmms-eval's convention)."""
    return numerator / denominator if denominator > 0 else torch.tensor(0.0, dtype=torch.float64)


class YesNoMetric(RowsMetric):
    """POPE: `update(read, truth, groups)` with readings 1 (yes), 0 (no), -1 (neither) and truths
    1 / 0. Per group and `all`: accuracy, precision, recall, F1 (lmms-eval's definitions: a reply
    that is neither yes nor no is wrong, and counts in no precision / recall denominator),
    `yes_ratio` (the share of replies read as yes: POPE's and LLaVA's `eval_pope.py`'s) and
    `truth_yes_ratio` (the share of questions whose answer is yes: what lmms-eval reports as
    `pope_yes_ratio`)."""

    fields = ("read", "truth", "group")

    def update(self, read: torch.Tensor | list, truth: torch.Tensor | list, groups: list[str]) -> None:
        self.append(read=read, truth=truth, group=self.group_index(groups))

    def compute(self) -> dict[str, torch.Tensor]:
        read, truth = self.column("read"), self.column("truth")
        result: dict[str, torch.Tensor] = {}
        for name, rows in self.per_group():
            r, t = read[rows], truth[rows]
            count = torch.tensor(float(rows.sum()), dtype=torch.float64)
            tp = ((t == 1) & (r == 1)).sum().double()
            fp = ((t == 0) & (r == 1)).sum().double()
            fn = ((t == 1) & (r == 0)).sum().double()
            precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
            result[f"{name}/accuracy"] = _ratio((r == t).sum().double(), count) if count else torch.tensor(NAN)
            result[f"{name}/precision"] = precision
            result[f"{name}/recall"] = recall
            result[f"{name}/f1"] = _ratio(2 * precision * recall, precision + recall)
            result[f"{name}/yes_ratio"] = _ratio((r == 1).sum().double(), count) if count else torch.tensor(NAN)
            result[f"{name}/truth_yes_ratio"] = _ratio((t == 1).sum().double(), ((t == 1) | (t == 0)).sum().double())
            result[f"{name}/count"] = count
        return result


class PairMetric(RowsMetric):
    """MME: `update(correct, pairs, groups)`, `pairs` the index of the question's image within
    its subtask (an image has two questions, one answered yes and one no). Per subtask: `acc`
    (percent of questions right), `acc_plus` (percent of images with both right) and their sum
    `score`; then the sums of `score` over `sections` (name -> subtasks), as MME's tables."""

    fields = ("correct", "pair", "group")

    def __init__(self, groups: list[str], sections: dict[str, list[str]], **kwargs) -> None:
        super().__init__(groups, **kwargs)
        self.sections = {name: list(members) for name, members in sections.items()}

    def update(self, correct: torch.Tensor | list, pairs: torch.Tensor | list, groups: list[str]) -> None:
        self.append(correct=correct, pair=pairs, group=self.group_index(groups))

    def compute(self) -> dict[str, torch.Tensor]:
        correct, pair, group = self.column("correct"), self.column("pair").long(), self.column("group").long()
        result: dict[str, torch.Tensor] = {}
        for index, name in enumerate(self.groups):
            rows = group == index
            if not rows.any():
                continue
            by_pair: dict[int, list[float]] = defaultdict(list)
            for p, c in zip(pair[rows].tolist(), correct[rows].tolist(), strict=True):
                by_pair[p].append(c)
            odd = [p for p, scores in by_pair.items() if len(scores) != 2]
            if odd:
                raise ValueError(f"MME subtask {name!r}: images {odd[:5]} do not have exactly two questions")
            acc = 100 * sum(sum(s) for s in by_pair.values()) / (2 * len(by_pair))
            acc_plus = 100 * sum(sum(s) == 2 for s in by_pair.values()) / len(by_pair)
            result[f"{name}/acc"] = torch.tensor(acc, dtype=torch.float64)
            result[f"{name}/acc_plus"] = torch.tensor(acc_plus, dtype=torch.float64)
            result[f"{name}/score"] = torch.tensor(acc + acc_plus, dtype=torch.float64)
        for section, members in self.sections.items():
            scores = [result[f"{m}/score"] for m in members if f"{m}/score" in result]
            result[f"{section}/score"] = torch.stack(scores).sum() if scores else torch.tensor(NAN)
        return result


class CircularMetric(RowsMetric):
    """MMBench's circular evaluation: `update(correct, circular, main, groups, subgroups)`; a
    question and its option rotations share `circular` (the index modulo 10**6), `main` marks the
    original. A question is a hit when every one of its rotations is right. Hit rates (0-1) per
    category (`groups`), per L2 category (`subgroups`, given at build time too) and `all`, over
    the originals, as MMBench's `eval_result`."""

    fields = ("correct", "circular", "main", "group", "subgroup")

    def __init__(self, groups: list[str], subgroups: list[str], **kwargs) -> None:
        super().__init__(groups, **kwargs)
        self.subgroups = list(subgroups)

    def update(
        self,
        correct: torch.Tensor | list,
        circular: torch.Tensor | list,
        main: torch.Tensor | list,
        groups: list[str],
        subgroups: list[str],
    ) -> None:
        sub = torch.tensor([self.subgroups.index(name) for name in subgroups], dtype=torch.float64)
        self.append(correct=correct, circular=circular, main=main, group=self.group_index(groups), subgroup=sub)

    def compute(self) -> dict[str, torch.Tensor]:
        correct, circular = self.column("correct"), self.column("circular").long()
        main, group, subgroup = self.column("main"), self.column("group").long(), self.column("subgroup").long()
        all_right: dict[int, bool] = defaultdict(lambda: True)
        for c, right in zip(circular.tolist(), correct.tolist(), strict=True):
            all_right[c] = all_right[c] and right == 1
        originals = (main == 1).nonzero().flatten().tolist()
        hits = {row: float(all_right[int(circular[row])]) for row in originals}
        result: dict[str, torch.Tensor] = {}

        def rate(rows: list[int]) -> torch.Tensor:
            return torch.tensor(sum(hits[r] for r in rows) / len(rows) if rows else NAN, dtype=torch.float64)

        result["all"] = rate(originals)
        for index, name in enumerate(self.groups):
            rows = [r for r in originals if int(group[r]) == index]
            if rows:
                result[f"category/{name}"] = rate(rows)
        for index, name in enumerate(self.subgroups):
            rows = [r for r in originals if int(subgroup[r]) == index]
            if rows:
                result[f"l2/{name}"] = rate(rows)
        result["count/questions"] = torch.tensor(float(len(originals)))
        result["count/rotations"] = torch.tensor(float(len(correct)))
        return result


class MeanScoreMetric(RowsMetric):
    """GQA, TextVQA: `update(scores, groups)`, each question's score in [0, 1]; the mean per
    group and over `all`."""

    fields = ("score", "group")

    def update(self, scores: torch.Tensor | list, groups: list[str]) -> None:
        self.append(score=scores, group=self.group_index(groups))

    def compute(self) -> dict[str, torch.Tensor]:
        score = self.column("score")
        result: dict[str, torch.Tensor] = {}
        for name, rows in self.per_group():
            result[name] = score[rows].mean() if rows.any() else torch.tensor(NAN, dtype=torch.float64)
            result[f"count/{name}"] = rows.sum().double()
        return result
