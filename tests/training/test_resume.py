"""A run killed with SIGKILL and resumed from its last checkpoint continues exactly: same
losses, bit for bit (float32, one process), as the run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

STEPS = 8
SETTINGS = [
    "--trainer.max_steps=8", "--trainer.val_check_interval=100", "--trainer.limit_val_batches=0",
    "--data.batch_size=4", "--data.samples_per_epoch=24", "--data.num_workers=1", "--data.window_batches=2",
]  # fmt: skip  # 24 scenes x 2 views / 4 = 12 batches an epoch: the kill lands mid-epoch


def command(root: Path, log: Path, *extra: str) -> list[str]:
    callbacks = root / "callbacks.yaml"
    callbacks.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {every_n_train_steps: 2, save_last: true, save_top_k: -1}\n"
        f"    - class_path: resume_helpers.LossLog\n      init_args: {{path: '{log}'}}\n"
    )
    return [sys.executable, "-m", "src.cli", "fit", "--config", str(ROOT / "lightning_config.yaml"),
            "--config", str(callbacks), f"--trainer.default_root_dir={root}", *SETTINGS, *extra]  # fmt: skip


def env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests/training'}", "OMP_NUM_THREADS": "1"}


def losses(log: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in map(json.loads, log.read_text().splitlines())}


def test_sigkill_then_resume_gives_the_uninterrupted_losses(tmp_path):
    straight = tmp_path / "straight"
    straight.mkdir()
    done = subprocess.run(command(straight, straight / "loss.jsonl"), cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    reference = losses(straight / "loss.jsonl")
    assert sorted(reference) == list(range(1, STEPS + 1))

    killed = tmp_path / "killed"
    killed.mkdir()
    pause = killed / "pause.yaml"
    pause.write_text("trainer:\n  callbacks+:\n    - class_path: resume_helpers.PauseAt\n      init_args: {step: 5}\n")
    run = subprocess.Popen(command(killed, killed / "loss.jsonl", "--config", str(pause)), cwd=ROOT, env=env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    deadline = time.time() + 600
    while not (killed / "paused").exists():
        assert run.poll() is None, run.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGKILL)  # the trainer and its dataloader worker, with no warning
    run.wait()
    (last,) = killed.rglob("last.ckpt")
    resumed = subprocess.run(command(killed, killed / "loss.jsonl", f"--ckpt_path={last}"), cwd=ROOT, env=env(),
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [json.loads(line) for line in (killed / "loss.jsonl").read_text().splitlines()]
    first = [r for r in rows[:5]]
    after = rows[5:]
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in after] == [5, 6, 7, 8]  # from the step-4 checkpoint on
    assert all(r["loss"] == reference[r["step"]] for r in rows)  # bit for bit
