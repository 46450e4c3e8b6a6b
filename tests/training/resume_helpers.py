"""Callbacks the resume test puts into real CLI runs (importable as `resume_helpers.X`)."""

from __future__ import annotations

import json
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
