"""Callbacks the resume test puts into real CLI runs (importable as `resume_helpers.X`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lightning.pytorch import Callback


class LossLog(Callback):
    """Appends each optimizer step's loss (a float32 value, written exactly) to a JSON-lines file."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        with self.path.open("a") as f:
            f.write(json.dumps({"step": trainer.global_step, "loss": float(loss)}) + "\n")


class PauseAt(Callback):
    """Sleeps after a given step, so a test can kill the run at a known point."""

    def __init__(self, step: int, seconds: float = 120.0) -> None:
        self.step, self.seconds = step, seconds

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(trainer.default_root_dir, "paused").write_text(str(self.step))
            time.sleep(self.seconds)


class KillAt(Callback):
    """Sends `signum` to the run's whole process group (the trainer and its data-loader workers, as a
    scheduler or Ctrl-C would): in the middle of the step after `step` optimizer steps, or, with
    `during_save`, while the `during_save`-th checkpoint of that step is being dumped (ModelCheckpoint
    writes `step=N.ckpt`, then `last.ckpt`: 2 kills it between the two files)."""

    def __init__(self, step: int, signum: int = 9, during_save: int = 0) -> None:
        self.step, self.signum, self.during_save = step, signum, during_save
        self.saves = 0

    def _kill(self) -> None:
        os.killpg(os.getpgrp(), self.signum)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if not self.during_save and trainer.global_step == self.step:
            self._kill()

    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        if self.during_save and trainer.global_step == self.step:
            self.saves += 1
            if self.saves == self.during_save:
                self._kill()
