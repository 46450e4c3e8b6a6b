"""benchmarks/gpu_check.py --dry-run: the GPU check at a tiny size on the CPU, so it cannot rot.

On the GPU it runs the same code at full size (BENCHMARKS.md, "The GPU check"); here every check
must pass or say why it skipped, and a check that finds a wrong result must report it.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tests.benchmarks.scripts import load_script

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def check():
    return load_script("gpu_check")


def test_the_dry_run_runs_every_check_and_writes_one_json(check, tmp_path):
    out = tmp_path / "check.json"
    report = check.main(["--dry-run", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=str))
    checks = report["checks"]
    assert list(checks) == list(check.CHECKS)
    assert report["passed"], {name: c["summary"] for name, c in checks.items()}
    assert checks["bf16_vs_fp32"]["max_rel_diff"] <= check.ts.BF16_RTOL
    backends = checks["packed_vs_unpacked"]["backends"]
    assert backends["sdpa_by_example"]["status"] == backends["sdpa"]["status"] == backends["eager"]["status"] == "pass"
    assert backends["sdpa"]["grad_rel_diff"] <= check.PACKED_GRAD_TOL
    assert backends["flex_attention"] == {"status": "skipped", "reason": "FlexAttention has no backward on a CPU"}
    fsdp = checks["fsdp2_one_gpu"]
    assert fsdp["status"] == "pass" and fsdp["units"] > 3 and len(fsdp["losses"]) == 2
    if importlib.util.find_spec("bitsandbytes") is None:
        assert checks["qlora"]["status"] == "skipped" and "bitsandbytes" in checks["qlora"]["summary"]
    sides = checks["train_step"]["sides"]
    assert {"baseline", "ours"} <= set(sides) and sides["ours"]["mfu"] > 0
    assert "liger" in checks["train_step"]["skipped_variants"]  # no CUDA here: Liger's kernels are Triton
    if checks["data_loader"]["status"] == "pass":
        assert checks["data_loader"]["results"]["ours_samples_per_s"] > 0


def test_a_packing_that_leaks_across_examples_fails_the_check(check, tmp_path, monkeypatch):
    """Positions that do not restart per example let examples attend to each other: the check must say so."""
    real = check.ts.collate_ours

    def leaky(samples, pad_id, max_length, batching):
        batch = real(samples, pad_id, max_length, batching)
        if batching != "pad":
            rows, width = batch["position_ids"].shape
            batch["position_ids"] = torch.arange(width).expand(rows, width).clone()
        return batch

    monkeypatch.setattr(check.ts, "collate_ours", leaky)
    report = check.main(["--dry-run", "--checks", "packed_vs_unpacked", "--out", str(tmp_path / "c.json")])
    result = report["checks"]["packed_vs_unpacked"]
    assert result["status"] == "fail" and not report["passed"]
    assert "packed != padded for ['sdpa_by_example', 'sdpa', 'eager']" in result["summary"]


def test_a_broken_check_is_reported_and_the_others_still_run(check, tmp_path, monkeypatch):
    def broken(cfg):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setitem(check.CHECKS, "qlora", broken)
    report = check.main(["--dry-run", "--checks", "qlora,fsdp2_one_gpu", "--out", str(tmp_path / "c.json")])
    assert report["checks"]["qlora"]["status"] == "error"
    assert report["checks"]["qlora"]["summary"] == "RuntimeError: CUDA error: an illegal memory access"
    assert report["checks"]["fsdp2_one_gpu"]["status"] == "pass" and not report["passed"]


def test_unknown_checks_are_refused(check, tmp_path):
    with pytest.raises(SystemExit, match=r"unknown checks \['mfu'\]"):
        check.main(["--dry-run", "--checks", "mfu", "--out", str(tmp_path / "c.json")])
