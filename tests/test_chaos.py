"""Chaos: one tiny run killed again and again (SIGKILL at seeded random steps, SIGKILL between writing
`step=N.ckpt` and updating `last.ckpt`, SIGTERM to the whole process group) and restarted each time with
`--ckpt_path last`, as a user or a scheduler would, ends exactly where the run that was never
interrupted ends: every step's loss and the final weights and optimizer state bit for bit (float32,
one process, one data-loader worker), in one run folder with one continuous TensorBoard curve."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

STEPS = 16  # 24 scenes x 2 views / 4 = 12 batches an epoch: the chain crosses an epoch boundary
EVERY = 2  # a checkpoint every 2 steps
SETTINGS = [
    f"--trainer.max_steps={STEPS}", "--trainer.val_check_interval=100", "--trainer.limit_val_batches=0",
    "--trainer.log_every_n_steps=1", "--data.batch_size=4", "--data.samples_per_epoch=24",
    "--data.num_workers=1", "--data.window_batches=2",
]  # fmt: skip


def _config(root: Path, name: str, text: str) -> list[str]:
    path = root / name
    path.write_text(text)
    return ["--config", str(path)]


def _command(root: Path, *extra: str) -> list[str]:
    callbacks = _config(
        root,
        "callbacks.yaml",
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        f"      init_args: {{every_n_train_steps: {EVERY}, save_last: true, save_top_k: -1}}\n"
        f"    - class_path: resume_helpers.LossLog\n      init_args: {{path: '{root / 'loss.jsonl'}'}}\n",
    )
    return [sys.executable, "-m", "src.cli", "fit", "--config", str(ROOT / "lightning_config.yaml"), *callbacks,
            f"--trainer.default_root_dir={root / 'run'}", *SETTINGS, *extra]  # fmt: skip


def _run(root: Path, *extra: str) -> subprocess.CompletedProcess:
    """One start of the run, in its own process group (a kill reaches its data-loader worker too)."""
    env = os.environ | {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests/training'}", "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    done = subprocess.run(_command(root, *extra), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          start_new_session=True)  # fmt: skip
    done.seconds = time.monotonic() - started
    return done


def _kill_at(root: Path, index: int, step: int, signum: int, during_save: int = 0) -> list[str]:
    return _config(
        root,
        f"kill{index}.yaml",
        "trainer:\n  callbacks+:\n    - class_path: resume_helpers.KillAt\n"
        f"      init_args: {{step: {step}, signum: {int(signum)}, during_save: {during_save}}}\n",
    )


def _rows(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "loss.jsonl").read_text().splitlines()]


def _step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]


def _scalar_steps(version: Path) -> set[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = set()
    for events in version.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if "train/loss" in accumulator.Tags()["scalars"]:
            steps |= {e.step for e in accumulator.Scalars("train/loss")}
    return steps


def test_killed_runs_resumed_with_ckpt_path_last_end_bit_for_bit_as_the_uninterrupted_one(tmp_path):
    straight = tmp_path / "straight"
    straight.mkdir()
    done = _run(straight)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = {r["step"]: r["loss"] for r in _rows(straight)}
    assert sorted(reference) == list(range(1, STEPS + 1))

    # the interruptions, in the order the chain meets them (seeded: the same every run)
    rng = random.Random(23)
    kills = sorted(rng.sample(range(EVERY, 7), 2)) + [rng.randrange(7, 10)]  # SIGKILL mid-step after these
    save_kill = 2 * rng.randrange(6, 7)  # SIGKILL between step=12.ckpt and last.ckpt
    term = 13  # SIGTERM mid-step 14 (after 13 steps)
    chaos = tmp_path / "chaos"
    chaos.mkdir()
    home = chaos / "run" / "lightning_logs" / "version_0"
    log = []

    def start(*extra: str) -> subprocess.CompletedProcess:
        done = _run(chaos, *(["--ckpt_path", "last"] if log else []), *extra)
        log.append((extra, done.returncode, round(done.seconds, 1)))
        return done

    for index, step in enumerate(kills):
        done = start(*_kill_at(chaos, index, step, signal.SIGKILL))
        assert done.returncode == -signal.SIGKILL, (log, done.stderr[-3000:])
        assert max(r["step"] for r in _rows(chaos)) == step  # killed in the step after

    done = start(*_kill_at(chaos, 3, save_kill, signal.SIGKILL, during_save=2))
    assert done.returncode == -signal.SIGKILL, (log, done.stderr[-3000:])
    checkpoints = home / "checkpoints"
    (written,) = checkpoints.glob(f"epoch=*-step={save_kill}.ckpt")
    assert _step(written) == save_kill  # written before the kill
    assert _step(checkpoints / "last.ckpt") == save_kill - EVERY  # not updated: the kill came first

    rows_before = len(_rows(chaos))
    done = start(*_kill_at(chaos, 4, term, signal.SIGTERM))
    assert done.returncode == 0, (log, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]  # the worker left quietly too
    resumed = [r["step"] for r in _rows(chaos)[rows_before:]]
    assert resumed == list(range(save_kill + 1, term + 2)), resumed  # from step=12.ckpt, not last.ckpt (10)
    assert _step(checkpoints / "last.ckpt") == term + 1  # saved at the end of the step SIGTERM came in

    rows_before = len(_rows(chaos))
    done = start()
    assert done.returncode == 0, (log, done.stderr[-3000:])
    assert [r["step"] for r in _rows(chaos)[rows_before:]] == list(range(term + 2, STEPS + 1))  # nothing twice

    # every step trained (some twice, after a SIGKILL), each with the uninterrupted run's loss, bit for bit
    rows = _rows(chaos)
    assert {r["step"] for r in rows} == set(reference)
    assert all(r["loss"] == reference[r["step"]] for r in rows), log
    final = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    expected = torch.load(straight / "run/lightning_logs/version_0/checkpoints/last.ckpt", map_location="cpu",
                          weights_only=True)  # fmt: skip
    assert final["global_step"] == expected["global_step"] == STEPS
    assert final["state_dict"].keys() == expected["state_dict"].keys()
    assert all(torch.equal(final["state_dict"][k], expected["state_dict"][k]) for k in expected["state_dict"])
    for mine, theirs in zip(final["optimizer_states"][0]["state"].values(),
                            expected["optimizer_states"][0]["state"].values(), strict=True):  # fmt: skip
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)

    # one run folder: every restart logged into version_0, and its curve covers every step but one: Lightning
    # saves a step's checkpoint before it logs the step, and the kill during the save came in between
    assert sorted(p.name for p in (chaos / "run" / "lightning_logs").iterdir()) == ["version_0"]
    assert _scalar_steps(home) == set(range(STEPS)) - {save_kill - 1}
    print("starts (interruption, exit code, seconds):", log)
