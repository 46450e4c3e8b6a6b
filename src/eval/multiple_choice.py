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
    """Per-sample correctness kept with a group id, so every rank's groups merge exactly."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=[], dist_reduce_fx="cat")
        self.add_state("group", default=[], dist_reduce_fx="cat")
        self.names: dict[int, str] = {}

    def update(self, predicted: torch.Tensor, answer: torch.Tensor, groups: list[str]) -> None:
        ids = [_group_id(g) for g in groups]
        self.names.update(zip(ids, groups, strict=True))
        self.correct.append((predicted == answer).float())
        self.group.append(torch.tensor(ids, dtype=torch.float32, device=answer.device))

    def compute(self) -> dict[str, torch.Tensor]:
        if isinstance(self.correct, list) and not self.correct:
            return {}
        correct = self.correct if isinstance(self.correct, torch.Tensor) else torch.cat(self.correct)
        group = self.group if isinstance(self.group, torch.Tensor) else torch.cat(self.group)
        names = dict(self.names)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[dict] = [{} for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather_object(gathered, self.names)  # a type seen on one rank only
            for other in gathered:
                names.update(other)
        result = {"all": correct.mean()}
        for gid in sorted({int(g) for g in group.tolist()}):
            name = names.get(gid, f"group{gid}")
            result[name] = correct[group == gid].mean()
        return result
