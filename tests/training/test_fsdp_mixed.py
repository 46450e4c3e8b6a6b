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
