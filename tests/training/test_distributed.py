"""DDP and FSDP2 over 2 CPU processes (gloo) train exactly like one process on the same
global batch, with and without gradient accumulation (tests/training/dist_fit.py)."""

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


CLIP = 0.05  # far below the gradient norms (about 2): clipping acts on every step, so it must see the right norm


def run(tmp_path: Path, name: str, *args: str) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """dist_fit.py's record ({"losses", "grad_norms"} per optimizer step) and final weights."""
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


def assert_same_run(run_: tuple[dict, dict], reference: tuple[dict, dict], steps: int = 10) -> None:
    (record, weights), (expected, expected_weights) = run_, reference
    assert len(record["losses"]) == len(expected["losses"]) == steps
    assert max(abs(a - b) for a, b in zip(record["losses"], expected["losses"], strict=True)) <= 1e-5
    assert record["grad_norms"] == pytest.approx(expected["grad_norms"], rel=1e-5)
    assert_same_weights(weights, expected_weights)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run(tmp_path_factory.mktemp("single"), "single", "--strategy", "single", "--micro", "4")


@pytest.fixture(scope="module")
def single_clipped(tmp_path_factory):
    return run(tmp_path_factory.mktemp("clipped"), "clipped", "--strategy", "single", "--micro", "4",
               "--clip", str(CLIP))  # fmt: skip


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one_on_the_same_global_batch(tmp_path, single, strategy):
    """Rows differ in supervised tokens, so ranks hold unequal token counts: the loss is weighted by them."""
    assert_same_run(run(tmp_path, strategy, "--strategy", strategy, "--micro", "2"), single)


@pytest.mark.parametrize(("strategy", "micro"), [("single", "2"), ("ddp", "1"), ("fsdp", "1")])
def test_gradient_accumulation_over_unequal_token_counts_equals_the_big_batch(
    tmp_path, single_clipped, strategy, micro
):
    """Micro-batches (and ranks) of unequal supervised-token counts, accumulated over 2 micro-batches
    per rank: every token weighs the same, so the logged losses, the gradient norms (before
    clipping) and the weights after 10 clipped AdamW steps are the one-process big batch's.

    Clipped: without it, AdamW's first step moves a weight whose gradient is near its eps (1e-8) by
    a fraction of lr that a change of summation order alone (micro-batches summed apart) shifts
    by 1e-5; clipped gradients are far below eps there, where the update is linear in them."""
    record = run(tmp_path, strategy, "--strategy", strategy, "--micro", micro, "--accumulate", "2",
                 "--clip", str(CLIP))  # fmt: skip
    assert_same_run(record, single_clipped)
    if strategy == "fsdp":  # FSDP2 reduces once per window: no sharded gradient after the first micro-batch
        assert record[0]["synced"] == [False, True] * 10


def test_fsdp_distributed_checkpoints_resume_exactly_and_consolidate(tmp_path):
    """Each rank writes its shard; a run resumed from the folder continues the losses, and the
    folder consolidates into one file that loads in a single process with the same weights."""
    from src.export import single_file
    from src.training.module import LlavaLitModule

    straight, weights = run(tmp_path, "a", "--strategy", "fsdp", "--micro", "2", "--steps", "6", "--save-every", "3")
    straight = straight["losses"]
    folder = tmp_path / "a-ckpt" / "step=3.ckpt"
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    resumed, resumed_weights = run(tmp_path, "b", "--strategy", "fsdp", "--micro", "2", "--steps", "6",
                                   "--resume", str(folder))  # fmt: skip
    resumed = resumed["losses"]
    assert len(resumed) == 3 and max(abs(a - b) for a, b in zip(resumed, straight[3:], strict=True)) <= 1e-6
    assert_same_weights(resumed_weights, weights)
    with single_file(tmp_path / "a-ckpt" / "step=6.ckpt") as path:
        module = LlavaLitModule.load_from_checkpoint(path, map_location="cpu")
    assert_same_weights({k: v for k, v in module.model.state_dict().items()}, weights)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path, strategy):
    """Row 5 (step 1) has NaN pixels: only rank 0 holds it, yet every rank skips that step, and the
    run goes on exactly as one process that skipped the same global batch (Lightning refuses a
    None step with several processes: the skipped step is a leaf zero there)."""
    single = run(tmp_path, "single-nan", "--strategy", "single", "--micro", "4", "--nan-row", "5")
    record = run(tmp_path, strategy, "--strategy", strategy, "--micro", "2", "--nan-row", "5")
    assert single[0]["bad_total"] == record[0]["bad_total"] == 1
    assert_same_run(record, single)
