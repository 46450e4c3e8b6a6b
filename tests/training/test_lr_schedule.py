"""src.training.stage's learning-rate schedule against transformers' own, the one LLaVA trains with.

LLaVA's scripts pass `--lr_scheduler_type cosine --warmup_ratio 0.03` to the HF Trainer, which
counts ceil(ratio x steps) warm-up steps (`TrainingArguments.get_warmup_steps`) and builds
`get_cosine_schedule_with_warmup`: the first step runs at lr 0. The kit's schedule must give the
same learning rate at every step for the same step count.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    TrainingArguments,
    get_cosine_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
)

from src.training.stage import OptimizerConfig, lr_schedule, warmup_steps_for

LCS_558K = 558_128  # records in blip_laion_cc_sbu_558k.json (stage 1)
MIX_665K = 665_298  # records in llava_v1_5_mix665k.json (stage 2)


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)


def _lrs(schedule: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    """The learning rate each optimizer step runs at, as the Trainer / Lightning step them."""
    lrs = []
    for _ in range(steps):
        lrs.append(schedule.get_last_lr()[0])
        schedule.optimizer.step()
        schedule.step()
    return lrs


def hf_warmup_steps(ratio: float, total: int) -> int:
    """The HF Trainer's warm-up count for `--warmup_ratio` (a float below 1 in transformers 5)."""
    return TrainingArguments.get_warmup_steps(SimpleNamespace(warmup_steps=ratio), total)


def hf_trainer_steps(samples: int, per_device: int, processes: int) -> int:
    """The HF Trainer's optimizer steps in one epoch without accumulation: the length of one
    process's share of the batches as accelerate deals them (`even_batches`: the last round is
    filled from the start of the data), what LLaVA's scripts run with."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    batches = BatchSampler(range(samples), per_device, drop_last=False)
    return len(BatchSamplerShard(batches, num_processes=processes, process_index=0, even_batches=True))


@pytest.mark.parametrize(
    ("total", "ratio"),
    [(2180, 0.03), (2181, 0.03), (5197, 0.03), (5198, 0.03), (100, 0.03), (10, 0.03), (7, 0.0), (3, 0.5)],
)
def test_every_step_has_transformers_learning_rate(total: int, ratio: float) -> None:
    ours = lr_schedule(_optimizer(), OptimizerConfig(lr=1e-3, warmup_ratio=ratio), total)
    warmup = hf_warmup_steps(ratio, total)
    theirs = get_cosine_schedule_with_warmup(_optimizer(), warmup, total)
    assert warmup_steps_for(OptimizerConfig(warmup_ratio=ratio), total) == warmup
    ours_lrs, theirs_lrs = _lrs(ours, total + 1), _lrs(theirs, total + 1)
    assert ours_lrs == theirs_lrs  # exactly, step for step
    assert ours_lrs[0] == (0.0 if warmup else 1e-3) and ours_lrs[total] == 0.0


def test_a_floor_and_explicit_warmup_steps_match_transformers_min_lr_schedule() -> None:
    total, warmup = 50, 4
    ours = lr_schedule(_optimizer(), OptimizerConfig(lr=1e-3, warmup_steps=warmup, min_lr_ratio=0.1), total)
    theirs = get_cosine_with_min_lr_schedule_with_warmup(_optimizer(), warmup, total, min_lr_rate=0.1)
    assert _lrs(ours, total + 1) == pytest.approx(_lrs(theirs, total + 1), rel=1e-12, abs=0)


def test_llava15_step_and_warmup_counts() -> None:
    """LLaVA-1.5 (8 GPUs, no accumulation): stage 1 32 per GPU, stage 2 16 per GPU. The HF Trainer
    runs one step more than the kit, whose epoch is whole global batches (558,128 // 256 = 2,180:
    the last 48 samples are not read; HF's last step reads them and fills the rest of its batches
    from the start of the data); the warm-up is the same length."""
    for samples, per_device, kit_steps, hf_steps, warmup in (
        (LCS_558K, 32, 2180, 2181, 66),
        (MIX_665K, 16, 5197, 5198, 156),
    ):
        global_batch = per_device * 8
        assert samples // global_batch == kit_steps  # what the datamodule counts (whole global batches)
        assert hf_trainer_steps(samples, per_device, 8) == hf_steps == math.ceil(samples / global_batch)
        assert warmup_steps_for(OptimizerConfig(warmup_ratio=0.03), kit_steps) == warmup
        assert hf_warmup_steps(0.03, hf_steps) == warmup
