"""ScienceQA accuracy by the paper's columns, as a torchmetrics Metric exact across processes.

Each question is kept as two numbers: whether it was answered right, and a bit mask of the
columns it counts in (plus two bits that mark an extraction failure and a missing
prediction). Both states are concatenated over ranks (`dist_reduce_fx="cat"`), so every
column's accuracy after a multi-process run is the one a single process over all the
questions computes, with no averaging of averages. The mask stays below 2**24, so it is
exact in float32, the dtype torchmetrics gives the empty state of a rank that saw nothing.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from src.eval.scienceqa_data import CATEGORIES

FAILED_BIT = 1 << len(CATEGORIES)
MISSING_BIT = FAILED_BIT << 1


def category_mask(names: list[str]) -> int:
    """The bits of the table's columns named (see `scienceqa_data.categories`)."""
    unknown = set(names) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"unknown ScienceQA categories {sorted(unknown)}; the table has {list(CATEGORIES)}")
    return sum(1 << CATEGORIES.index(name) for name in names)


class ScienceQAAccuracy(Metric):
    """`update(predicted, answer, masks)`: predicted option per question (-1: no answer, wrong),
    the true option, and each question's `category_mask` (optionally with FAILED_BIT /
    MISSING_BIT set). `compute()`: accuracy (0-1) overall as `Avg` and per column, NaN for an
    empty column, and `count/<name>`, `count/failed`, `count/missing`."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=[], dist_reduce_fx="cat")
        self.add_state("mask", default=[], dist_reduce_fx="cat")

    def update(self, predicted: torch.Tensor, answer: torch.Tensor, masks: torch.Tensor | list[int]) -> None:
        masks = torch.as_tensor(masks, device=answer.device)
        if not (predicted.shape == answer.shape == masks.shape) or predicted.dim() != 1:
            raise ValueError(
                f"predicted, answer and masks must be 1-D of one length, got {tuple(predicted.shape)}, "
                f"{tuple(answer.shape)} and {tuple(masks.shape)}"
            )
        self.correct.append(((predicted == answer) & (predicted >= 0)).float())
        self.mask.append(masks.to(torch.float32))

    def compute(self) -> dict[str, torch.Tensor]:
        correct, mask = _cat(self.correct), _cat(self.mask)
        bits = mask.to(torch.int64)
        result = {"Avg": correct.mean() if len(correct) else torch.tensor(float("nan"))}
        counts = {"count/all": torch.tensor(float(len(correct)))}
        for index, name in enumerate(CATEGORIES):
            member = (bits >> index) & 1 == 1
            counts[f"count/{name}"] = member.sum().float()
            result[name] = correct[member].mean() if member.any() else torch.tensor(float("nan"))
        counts["count/failed"] = ((bits & FAILED_BIT) != 0).sum().float()
        counts["count/missing"] = ((bits & MISSING_BIT) != 0).sum().float()
        return result | counts


def _cat(state: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    if isinstance(state, torch.Tensor):
        return state
    return torch.cat(state) if state else torch.zeros(0)
