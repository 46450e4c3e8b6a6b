"""FSDP2 with a text-only batch on one rank and images on the other: training, scoring and
generation equal the unsharded model (see fsdp_mixed.py). Without the tower run on a blank
image and the root gathered around score_candidates / generation, gloo aborts on mismatched
collectives (NCCL would hang)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("fsdp_mixed.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fsdp_ranks_with_and_without_images_train_score_and_generate_as_unsharded(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(free_port()), str(tmp_path)], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        loss, expected = result["loss"]
        assert loss == pytest.approx(expected, rel=1e-5)
        assert result["grads_checked"] == result["params"] > 0  # every trained parameter got its gradient
        assert result["max_grad_error"] <= 1e-5 * max(1.0, result["max_grad"])
        assert result["scores_error"] < 1e-4
        replies, expected_replies = result["replies"]
        assert replies == expected_replies


def validate(tmp_path: Path, *args: str) -> dict[str, float]:
    """`python -m src.cli validate` on the demo config and val shards; the printed metrics."""
    import os
    import re

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "src.cli", "validate", "--config", "lightning_config.yaml",
         "--trainer.limit_val_batches", "null", f"--trainer.default_root_dir={tmp_path}", "--trainer.callbacks=[]",
         "--data.num_workers", "0", "--data.eval_batch_size", "129", "--seed_everything", "0", *args],
        cwd=root, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: float(value) for name, value in re.findall(r"(val/\S+)\s+│\s+([-0-9.e]+)", done.stdout)}


@pytest.mark.slow
def test_fsdp_validation_with_one_batch_more_on_one_rank_ends_and_counts_every_question(tmp_path):
    """775 questions in batches of 129 split over 2 ranks: one rank has a batch more. Its partner
    runs a discarded filler batch in step (LockstepBatches), so FSDP's gathers pair up; before,
    validation hung. Every question is scored once: the accuracy equals one process's."""
    single = validate(tmp_path / "one")
    sharded = validate(
        tmp_path / "two", "--trainer.devices", "2", "--trainer.strategy",
        "{class_path: src.training.sharding.FSDP2Strategy}",
    )  # fmt: skip
    assert single["val/mc_accuracy"] > 0
    for name in ("val/mc_accuracy", "val/mc_accuracy_colour", "val/mc_accuracy_count", "val/mc_accuracy_shape"):
        assert sharded[name] == pytest.approx(single[name], abs=1e-6), name
