"""benchmarks/train_step.py at its tiny size: ours and transformers' Llava compute the same losses.

This is the CI guard for the speed work: every trick of ours (packing, supervised-only
chunked logits, fused AdamW, ...) runs against the baseline on the same samples from the
same weights, and any change of the math stops the benchmark with `LossMismatch`.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from src.data.conversation import IGNORE_INDEX
from tests.benchmarks.scripts import load_script

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def bench():
    return load_script("train_step")


def test_every_variant_of_ours_computes_the_baselines_losses(bench, tmp_path):
    out = tmp_path / "results.json"
    returned = bench.main(["--preset", "tiny", "--ablation", "--memory-probe", "none", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["sides"].keys() == returned["sides"].keys()
    preset = bench.PRESETS["tiny"]
    baseline = results["sides"]["baseline"]
    assert len(baseline["losses"]) == preset.warmup + preset.steps
    assert len(baseline["step_seconds"]) == preset.steps
    assert 5.0 < baseline["losses"][0] < 7.0  # about ln(512) from random weights
    names = set(results["sides"]) - {"baseline"}
    assert {"ours", "ours, padded (no packing)", "ours, logits at every position", "ours, unfused AdamW"} <= names
    assert "ours, logits unchunked" in names and "ours + bf16 frozen tower" in names
    for name in names:
        side = results["sides"][name]
        rtol = bench.BF16_RTOL if "bf16" in name else bench.FP32_RTOL
        assert side["max_loss_rel_diff"] <= rtol, name
        for ours, theirs in zip(side["losses"], baseline["losses"], strict=True):
            assert ours == pytest.approx(theirs, rel=rtol)
        assert side["tokens_per_s"] > 0 and side["tokens_per_s_ratio_median"] > 0
        assert side["peak_mb"] >= side["state_mb"] > 0
    # the steps are real LLaVA-like batches: some padding for the baseline, a minority of tokens supervised
    assert 0 < results["padded_fraction"] < 1
    assert 0 < results["supervised_fraction"] < 0.6
    assert results["image_tokens"] == 16


def test_a_trick_that_changes_the_math_stops_the_benchmark(bench, monkeypatch):
    """Packing whose positions do not restart per example lets examples attend to each other."""
    real = bench.collate_ours

    def leaky(samples, pad_id, max_length, batching):
        batch = real(samples, pad_id, max_length, batching)
        if batching != "pad":
            rows, width = batch["position_ids"].shape
            batch["position_ids"] = torch.arange(width).expand(rows, width).clone()
        return batch

    monkeypatch.setattr(bench, "collate_ours", leaky)
    with pytest.raises(bench.LossMismatch, match="changed the math"):
        bench.main(["--preset", "tiny", "--steps", "1", "--warmup", "0", "--memory-probe", "none"])


def test_cpu_peak_memory_comes_from_one_child_process_per_side(bench):
    results = bench.main(["--preset", "tiny", "--steps", "1", "--warmup", "1", "--threads", "1"])
    for name in ("baseline", "ours"):
        side = results["sides"][name]
        assert side["peak_mb_from"].startswith("peak RSS of a child process")
        assert side["peak_mb"] > 0  # the children's losses were checked against this run's
    assert results["sides"]["ours"]["peak_memory_ratio"] == pytest.approx(
        results["sides"]["ours"]["peak_mb"] / results["sides"]["baseline"]["peak_mb"]
    )


def test_the_sample_stream_is_llava_like(bench):
    samples = bench.make_samples(
        400, image_tokens=576, image_size=4, image_token_id=31999, max_length=2048, seed=3
    )  # tiny pixels: only the token layout is looked at
    text_only = [s for s in samples if s.pixel_values is None]
    assert 0.05 < len(text_only) / len(samples) < 0.15
    lengths = sorted(int(s.input_ids.shape[0]) for s in samples)
    assert max(lengths) <= 2048
    text_lengths = sorted(int(s.input_ids.shape[0]) - 576 for s in samples if s.pixel_values is not None)
    median = text_lengths[len(text_lengths) // 2]
    assert 60 < median < 400 and text_lengths[-1] > 3 * median  # long-tailed
    for s in samples:
        images = int((s.input_ids == 31999).sum())
        assert images == (0 if s.pixel_values is None else 576)
        supervised = s.labels != IGNORE_INDEX
        assert supervised.any() and not supervised[s.input_ids == 31999].any()
        assert torch.equal(s.labels[supervised], s.input_ids[supervised])


def test_baseline_batches_are_one_modality_and_padded_like_llava(bench):
    samples = bench.make_samples(60, image_tokens=16, image_size=4, image_token_id=511, max_length=256, seed=0,
                                 text_scale=0.2)  # fmt: skip
    batches = bench.modality_batches(samples, 4, random.Random(0))
    assert batches and all(len(b) == 4 for b in batches)
    assert all(len({s.pixel_values is None for s in b}) == 1 for b in batches)
    batch = bench.collate_padded(batches[0], pad_id=0)
    lengths = [int(s.input_ids.shape[0]) for s in batches[0]]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_the_bf16_path_of_the_gpu_preset_runs_and_reports_mfu(bench):
    """bf16 autocast, the frozen tower stored in bf16 and MFU, as the GPU preset uses them, on the CPU."""
    results = bench.main(
        ["--preset", "tiny", "--dtype", "bfloat16", "--steps", "2", "--warmup", "1", "--memory-probe", "none",
         "--variants", "ours,tower-fp32", "--peak-flops", "1e11"]
    )  # fmt: skip
    assert results["loss_rtol"] == bench.BF16_RTOL
    ours = results["sides"]["ours"]
    assert (
        "tower bf16" in ours["settings"]
        and "tower as model" in results["sides"]["ours, float32 frozen tower"]["settings"]
    )
    assert ours["max_loss_rel_diff"] <= bench.BF16_RTOL
    for side in results["sides"].values():
        seconds = sum(side["step_seconds"])
        expected = results["useful_tflops_per_step"] * 1e12 * results["timed_steps"] / seconds / 1e11
        assert side["mfu"] == pytest.approx(expected, rel=1e-6)


def test_rows_padded_to_full_width_keep_each_example_and_add_one_segment(bench):
    """`pack-full` (the flex variant: one shape, compiled once): same examples, labels and positions, plus a tail."""
    from transformers.masking_utils import find_packed_sequence_indices

    samples = bench.make_samples(6, image_tokens=16, image_size=4, image_token_id=511, max_length=256, seed=1,
                                 text_scale=0.2)  # fmt: skip
    packed = bench.collate_ours(samples, 0, 256, "pack")
    full = bench.collate_ours(samples, 0, 256, "pack-full")
    width = packed["input_ids"].shape[1]
    assert full["input_ids"].shape == (packed["input_ids"].shape[0], 256) and width < 256
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(full[key][:, :width], packed[key])
    assert (full["labels"][:, width:] == IGNORE_INDEX).all() and (full["input_ids"][:, width:] == 0).all()
    segments = find_packed_sequence_indices(full["position_ids"])
    # the added tail is a segment of its own: nothing real attends to it
    assert (segments[:, width] == segments[:, width - 1] + 1).all()
    assert full["seq_lens"] == packed["seq_lens"]


def test_variants_that_need_a_gpu_say_so_on_a_cpu(bench):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(ValueError, match="variant flex needs a CUDA GPU: FlexAttention has no backward on a CPU"):
        bench.main(["--preset", "tiny", "--variants", "ours,flex", "--memory-probe", "none"])
    with pytest.raises(ValueError, match="variant liger cannot run here: Liger's kernels are Triton kernels"):
        bench.main(["--preset", "tiny", "--variants", "liger", "--memory-probe", "none"])
