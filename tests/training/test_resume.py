"""Resuming: which checkpoint `--ckpt_path last` / `auto` finds (the run's newest that loads), that a
resumed fit logs into the run's own folder, that nothing found is an error naming where it looked, and
that SIGTERM saves at the end of the step and exits 0 (fast, on small files and a tiny model); and a run
killed with SIGKILL and resumed from an explicit `.../last.ckpt` continues exactly: same losses, bit for
bit (float32, one process), in the same run folder (slow; tests/test_chaos.py kills many times)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from src.cli import main, resolve_ckpt_path
from src.model.weights import KIT_HPARAMS
from src.training.resume import StopOnSignal, find_resume_checkpoint

ROOT = Path(__file__).resolve().parents[2]

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


@pytest.mark.slow
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
    assert sorted(p.name for p in (killed / "lightning_logs").iterdir()) == ["version_0"]  # the run's own folder


# ---- which checkpoint: small files, real Trainer objects -----------------------------------------


def _checkpoint(path: Path, step: int, mtime: float) -> Path:
    """A file the kit's loader takes for a checkpoint of this kit, holding `step`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    hparams = {key: None for key in KIT_HPARAMS}
    torch.save({"state_dict": {"model.w": torch.full((2,), float(step))}, "hyper_parameters": hparams,
                "global_step": step}, path)  # fmt: skip
    os.utime(path, (mtime, mtime))
    return path


def _trainer(root: Path, **checkpointing) -> Trainer:
    return Trainer(default_root_dir=root, logger=TensorBoardLogger(root), callbacks=[ModelCheckpoint(**checkpointing)],
                   enable_progress_bar=False, enable_model_summary=False)  # fmt: skip


def test_last_is_the_newest_checkpoint_that_loads_not_the_last_ckpt_file(tmp_path: Path) -> None:
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    _checkpoint(folder / "last.ckpt", 20, 1000)
    newest = _checkpoint(folder / "epoch=0-step=30.ckpt", 30, 1001)  # a kill came before last.ckpt was updated
    torn = folder / "epoch=0-step=40.ckpt"
    torn.write_bytes(newest.read_bytes()[:-200])  # cut short (a copy, a full disk)
    found = find_resume_checkpoint(_trainer(tmp_path))
    assert (found.path, found.step, found.version) == (newest, 30, "version_0")
    assert [path for path, _ in found.skipped] == [torn]
    assert "damaged or truncated zip" in found.skipped[0][1]


def test_the_run_written_last_wins_over_an_older_one_with_more_steps(tmp_path: Path) -> None:
    logs = tmp_path / "lightning_logs"
    _checkpoint(logs / "version_0" / "checkpoints" / "last.ckpt", 3000, 1000)  # an earlier, finished run
    resumed = _checkpoint(logs / "version_1" / "checkpoints" / "last.ckpt", 500, 2000)
    found = find_resume_checkpoint(_trainer(tmp_path))
    assert (found.path, found.version) == (resumed, "version_1")


def test_an_hpc_checkpoint_competes_by_step_and_the_run_keeps_its_version(tmp_path: Path) -> None:
    periodic = _checkpoint(tmp_path / "lightning_logs" / "version_7" / "checkpoints" / "last.ckpt", 40, 1000)
    hpc = _checkpoint(tmp_path / "hpc_ckpt_1.ckpt", 45, 900)
    found = find_resume_checkpoint(_trainer(tmp_path))
    assert (found.path, found.step, found.version) == (hpc, 45, "version_7")
    _checkpoint(tmp_path / "hpc_ckpt_1.ckpt", 30, 900)  # an older signal checkpoint: the periodic one is newer
    assert find_resume_checkpoint(_trainer(tmp_path)).path == periodic


def test_a_fixed_dirpath_is_searched_and_the_newest_log_folder_kept(tmp_path: Path) -> None:
    kept = _checkpoint(tmp_path / "ckpts" / "step=9.ckpt", 9, 1000)
    for version, written in (("version_0", 500), ("version_1", 800)):
        events = tmp_path / "lightning_logs" / version / "events.out.tfevents.1.host"
        events.parent.mkdir(parents=True)
        events.write_bytes(b"")
        os.utime(events, (written, written))
    found = find_resume_checkpoint(_trainer(tmp_path, dirpath=tmp_path / "ckpts"))
    assert (found.path, found.version) == (kept, "version_1")


def test_a_resumed_fit_logs_and_checkpoints_into_the_run_it_resumes(tmp_path: Path, capsys) -> None:
    checkpoint = _checkpoint(tmp_path / "lightning_logs" / "version_3" / "checkpoints" / "last.ckpt", 12, 1000)
    _checkpoint(tmp_path / "lightning_logs" / "version_4" / "checkpoints" / "old.ckpt", 5, 10)
    trainer, config = _trainer(tmp_path), {"ckpt_path": "last"}
    resolve_ckpt_path(trainer, config, "fit")
    assert config["ckpt_path"] == str(checkpoint)
    assert trainer.logger.version == 3 and Path(trainer.log_dir) == tmp_path / "lightning_logs" / "version_3"
    err = capsys.readouterr().err
    assert f"--ckpt_path last: resuming from {checkpoint} (step 12)" in err
    assert f"logging into {tmp_path / 'lightning_logs' / 'version_3'}" in err
    # an explicit file of a run folder: the same; `test` from it keeps a folder of its own
    trainer = _trainer(tmp_path)
    resolve_ckpt_path(trainer, {"ckpt_path": str(checkpoint)}, "fit")
    assert trainer.logger.version == 3
    trainer, config = _trainer(tmp_path), {"ckpt_path": "last"}
    resolve_ckpt_path(trainer, config, "test")
    assert config["ckpt_path"] == str(checkpoint) and trainer.logger.version == 5


def test_auto_starts_a_new_run_when_there_is_nothing_and_says_so(tmp_path: Path, capsys) -> None:
    config = {"ckpt_path": "auto"}
    resolve_ckpt_path(_trainer(tmp_path), config, "fit")
    assert config["ckpt_path"] is None
    assert "--ckpt_path auto: no checkpoint yet (looked in " in capsys.readouterr().err


def test_last_with_nothing_to_resume_is_an_error_saying_where_it_looked(tmp_path: Path, capsys) -> None:
    root = tmp_path / "run"
    args = ["fit", "--config", str(ROOT / "lightning_config.yaml"), f"--trainer.default_root_dir={root}",
            "--ckpt_path", "last"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"error: --ckpt_path last: no checkpoint to resume from; looked in {root / 'lightning_logs' / '*' / 'checkpoints'}"
        f", {root / 'hpc_ckpt_*.ckpt'}. To start a new run, leave --ckpt_path out, or pass --ckpt_path auto (resume "
        "when there is a checkpoint, start fresh when there is none)"
    )
    assert not root.exists()  # nothing was built, no empty version_N


def test_auto_is_for_fit_only(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", str(ROOT / "lightning_config.yaml"), "--ckpt_path", "auto"])
    assert exit_info.value.code == 2
    assert "--ckpt_path auto is for fit" in capsys.readouterr().err


# ---- SIGTERM: a checkpoint at the end of the step, exit 0 -------------------------------------------


class _SignalSelf(Callback):
    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)  # mid-step, as a scheduler's signal comes


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_at_the_end_of_the_step_and_exits_0(tmp_path: Path, signum: int) -> None:
    from test_faults import batches, tiny
    from torch.utils.data._utils import signal_handling

    module, before, worker_setup = tiny(), signal.getsignal(signum), signal_handling._set_worker_signal_handlers
    trainer = Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=6, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[StopOnSignal(), _SignalSelf(2, signum)])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        trainer.fit(module, train_dataloaders=batches(module, poisoned=set(), count=6))
    assert exit_info.value.code == 0
    assert trainer.global_step == 3  # the step the signal came in was finished, no further
    saved = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(saved, map_location="cpu", weights_only=True)["global_step"] == 3
    assert signal.getsignal(signum) == before  # handlers given back
    assert signal_handling._set_worker_signal_handlers is worker_setup
