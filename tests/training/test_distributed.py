"""DDP and FSDP2 over 2 CPU processes (gloo) train exactly like one process on the same
global batch, and gradient accumulation like the doubled micro-batch (tests/training/dist_fit.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run(tmp_path: Path, name: str, *args: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    out = tmp_path / name
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests/training/dist_fit.py"), *args, "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(Path(f"{out}.json").read_text()), torch.load(f"{out}.pt", weights_only=True)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= 1e-5, worst


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run(tmp_path_factory.mktemp("single"), "single", "--strategy", "single", "--micro", "4")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one_on_the_same_global_batch(tmp_path, single, strategy):
    """Rows differ in supervised tokens, so ranks hold unequal token counts: the loss is weighted by them."""
    losses, weights = run(tmp_path, strategy, "--strategy", strategy, "--micro", "2")
    reference_losses, reference_weights = single
    assert len(losses) == len(reference_losses) == 10
    assert max(abs(a - b) for a, b in zip(losses, reference_losses, strict=True)) <= 1e-5
    assert_same_weights(weights, reference_weights)


def test_gradient_accumulation_equals_the_doubled_micro_batch(tmp_path):
    """Micro-batch losses are token means: with equal token counts per micro-batch, 2 x 2 = 4."""
    doubled, doubled_weights = run(tmp_path, "doubled", "--strategy", "single", "--micro", "4", "--equal-lengths")
    halves, weights = run(tmp_path, "accumulated", "--strategy", "single", "--micro", "2", "--accumulate", "2",
                          "--equal-lengths")  # fmt: skip
    assert len(halves) == 2 * len(doubled)
    pairs = [(halves[2 * i] + halves[2 * i + 1]) / 2 for i in range(len(doubled))]
    assert max(abs(a - b) for a, b in zip(pairs, doubled, strict=True)) <= 1e-5
    assert_same_weights(weights, doubled_weights)


def test_fsdp_distributed_checkpoints_resume_exactly_and_consolidate(tmp_path):
    """Each rank writes its shard; a run resumed from the folder continues the losses, and the
    folder consolidates into one file that loads in a single process with the same weights."""
    from src.export import single_file
    from src.training.module import LlavaLitModule

    straight, weights = run(tmp_path, "a", "--strategy", "fsdp", "--micro", "2", "--steps", "6", "--save-every", "3")
    folder = tmp_path / "a-ckpt" / "step=3.ckpt"
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    resumed, resumed_weights = run(tmp_path, "b", "--strategy", "fsdp", "--micro", "2", "--steps", "6",
                                   "--resume", str(folder))  # fmt: skip
    assert len(resumed) == 3 and max(abs(a - b) for a, b in zip(resumed, straight[3:], strict=True)) <= 1e-6
    assert_same_weights(resumed_weights, weights)
    with single_file(tmp_path / "a-ckpt" / "step=6.ckpt") as path:
        module = LlavaLitModule.load_from_checkpoint(path, map_location="cpu")
    assert_same_weights({k: v for k, v in module.model.state_dict().items()}, weights)
