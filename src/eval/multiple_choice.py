"""Multiple-choice accuracy, overall and per question type, correct across processes."""

from __future__ import annotations

import zlib

import torch
from torchmetrics import Metric


def _group_id(name: str) -> int:
    # the same on every rank, unlike an order of first sight; 24 bits so that it is exact
    # in float32, the dtype torchmetrics gives the empty state of a rank that saw nothing
    return zlib.crc32(name.encode()) & 0xFFFFFF


class MultipleChoiceAccuracy(Metric):
    """Per-sample correctness kept with a group id, so every rank's groups merge exactly.

    A question may count in several groups (ScienceQA's table: a subject, TXT / IMG / NO, a
    grade band): each of its groups gets an entry, and `all` counts every question once.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("answered", default=[], dist_reduce_fx="cat")  # one per question: `all`
        self.add_state("correct", default=[], dist_reduce_fx="cat")  # one per (question, group)
        self.add_state("group", default=[], dist_reduce_fx="cat")
        self.names: dict[int, str] = {}

    def update(self, predicted: torch.Tensor, answer: torch.Tensor, groups: list[str | list[str]]) -> None:
        """`groups[i]`: the group of question i, or a list of the groups it counts in."""
        right = (predicted == answer).float()
        rows, ids = [], []
        for row, group in enumerate(groups):
            for name in [group] if isinstance(group, str) else group:
                rows.append(row)
                ids.append(_group_id(name))
                self.names[ids[-1]] = name
        self.answered.append(right)
        self.correct.append(right[torch.tensor(rows, dtype=torch.long, device=right.device)])
        self.group.append(torch.tensor(ids, dtype=torch.float32, device=answer.device))

    def compute(self) -> dict[str, torch.Tensor]:
        if isinstance(self.answered, list) and not self.answered:
            return {}
        answered, correct, group = (
            state if isinstance(state, torch.Tensor) else torch.cat(state)
            for state in (self.answered, self.correct, self.group)
        )
        names = dict(self.names)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[dict] = [{} for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather_object(gathered, self.names)  # a type seen on one rank only
            for other in gathered:
                names.update(other)
        result = {"all": answered.mean()}
        for gid in sorted({int(g) for g in group.tolist()}):
            name = names.get(gid, f"group{gid}")
            result[name] = correct[group == gid].mean()
        return result
