"""PredictionWriter: `predict`'s answers as JSONL, one line per sample, the same under any number of processes.

Each process appends its rows to its own part file as batches finish (a crash keeps what
was done); at the end rank 0 merges the parts in input order (each sample's index in the
shards or JSON) into the final file and removes them, so 1 process and N processes write
the same file. `prompt` is the whole prompt as the model read it (the template's rendering, bos
included, one `<image>` per image). A line:

    {"id": "...", "prompt": "...", "answer": "...", "reference": "..." | null, "finish": "eos" | "stop" | "length",
     "model": "<checkpoint> | init_from <weights> (no --ckpt_path) | untrained (no --ckpt_path)", "settings": {"max_new_tokens": ..., "temperature": ..., "top_p": ..., "seed": ...,
                                  "stop": [...], "template": ..., "system_prompt": ..., "max_length": ...}}
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

DEFAULT_NAME = "predictions.jsonl"
DATA_SETTINGS = ("template", "system_prompt", "max_length", "blank_images")


def read_predictions(path: str | Path) -> list[dict]:
    """The lines of a predictions file, in order."""
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


def unique_ids(rows: list[dict]) -> int:
    """Renames repeated ids `<id>_2`, `<id>_3` ... in order (a JSONL keyed by id loses nothing); returns how many."""
    seen: Counter[str] = Counter(row["id"] for row in rows)
    taken = set(seen)
    count: Counter[str] = Counter()
    renamed = 0
    for row in rows:
        sample_id = row["id"]
        if seen[sample_id] == 1:
            continue
        count[sample_id] += 1
        if count[sample_id] == 1:
            continue
        n = count[sample_id]
        while f"{sample_id}_{n}" in taken:
            n += 1
        row["id"] = f"{sample_id}_{n}"
        taken.add(row["id"])
        renamed += 1
    return renamed


def weights_loaded(pl_module: LightningModule | None) -> list[str]:
    """Where a module's weights came from without a checkpoint: `init_from` and hub weights."""
    hparams = getattr(pl_module, "hparams", {}) or {}
    loaded = [f"init_from {hparams['init_from']}"] if hparams.get("init_from") else []
    rebuilt = pl_module.rebuildable_parts() if hasattr(pl_module, "rebuildable_parts") else set()
    for part, config in (("llm", "llm_config"), ("vision", "vision_config")):
        name = getattr(getattr(pl_module, config, None), "name", None)
        if part in rebuilt and name and part not in getattr(pl_module, "init_parts", set()):
            loaded.append(f"{part} {name}")
    return loaded


class PredictionWriter(BasePredictionWriter):
    """Writes `predict`'s answers (LlavaLitModule.predict_step) to a JSONL file.

    The default file is `predictions.jsonl` in the predict run's log folder
    (`<default_root_dir>/lightning_logs/version_N/`, beside the `config.yaml` that made it).
    """

    def __init__(self, output: str | None = None, model_name: str | None = None) -> None:
        """
        Args:
            output: the JSONL file; default: `predictions.jsonl` in the predict run's log folder.
            model_name: the `model` field of every line; default: the checkpoint path (`--ckpt_path`).
        """
        super().__init__(write_interval="batch")
        self.output = output
        self.model_name = model_name
        self.path: Path | None = None
        self._part = None
        self._rows = 0
        self._settings: dict | None = None
        self._model = ""

    # ---- where ------------------------------------------------------------------------
    def _resolve(self, trainer: Trainer) -> Path:
        if self.output is not None:
            return Path(self.output)
        folder = trainer.log_dir or trainer.default_root_dir  # broadcast from rank 0 by Lightning
        return Path(folder) / DEFAULT_NAME

    def _part_path(self, rank: int) -> Path:
        assert self.path is not None
        return self.path.with_name(f"{self.path.name}.rank{rank}")

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "predict":
            return
        # rows carry their own sample index, so Lightning's batch indices (none for a streamed dataset) are not needed
        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices fetched from your dataloader")
        self.path = self._resolve(trainer)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._part = open(self._part_path(trainer.global_rank), "w", encoding="utf-8")  # noqa: SIM115
        self._rows = 0
        self._settings = None

    # ---- what -------------------------------------------------------------------------
    def settings(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        settings = dict(pl_module.generation_settings()) if hasattr(pl_module, "generation_settings") else {}
        data = getattr(trainer, "datamodule", None)
        hparams = getattr(data, "hparams", {}) or {}
        settings.update({key: hparams[key] for key in DATA_SETTINGS if key in hparams})
        return settings

    def model_label(self, trainer: Trainer, pl_module: LightningModule | None = None) -> str:
        """The weights that answered: the checkpoint, else what the config loaded (an imported model's
        `init_from`, a hub LLM or tower), else "untrained"."""
        if self.model_name is not None:
            return self.model_name
        if trainer.ckpt_path:
            return str(trainer.ckpt_path)
        loaded = weights_loaded(pl_module)
        return f"{', '.join(loaded)} (no --ckpt_path)" if loaded else "untrained (no --ckpt_path)"

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if self._part is None or not prediction:
            return
        if self._settings is None:
            self._settings = self.settings(trainer, pl_module)
            self._model = self.model_label(trainer, pl_module)
        for row in prediction:
            line = {
                "id": str(row["id"]),
                "prompt": row.get("prompt", ""),
                "answer": row["answer"],
                "reference": row.get("reference"),
                "finish": row.get("finish"),
                "model": self._model,
                "settings": self._settings,
                "index": row.get("index"),
            }
            self._part.write(json.dumps(line, ensure_ascii=False) + "\n")
            self._rows += 1
        self._part.flush()

    # ---- merge ------------------------------------------------------------------------
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._part is None:
            return
        self._part.close()
        self._part = None
        skipped = Counter({k.split("/", 1)[1]: v for k, v in getattr(pl_module, "skipped", {}).items()
                           if k.startswith("predict/")})  # fmt: skip
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            gathered: list[Counter] = [Counter() for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, skipped)
            skipped = sum(gathered, Counter())
        trainer.strategy.barrier("predictions_written")
        if trainer.is_global_zero:
            self.merge(trainer.world_size, skipped)
        trainer.strategy.barrier("predictions_merged")

    def merge(self, world_size: int, skipped: Counter | None = None) -> Path:
        """Rank 0: the parts of all ranks -> the final file in input order; the parts are removed."""
        assert self.path is not None
        rows: list[dict] = []
        for rank in range(world_size):
            part = self._part_path(rank)
            if not part.is_file():
                raise FileNotFoundError(f"rank {rank}'s predictions {part} are missing (a shared folder is needed)")
            rows += read_predictions(part)
        rows.sort(key=lambda row: (row["index"] is None, row["index"] or 0, row["id"]))
        renamed = unique_ids(rows)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as stream:
            for row in rows:
                row.pop("index", None)
                stream.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, self.path)
        for rank in range(world_size):
            self._part_path(rank).unlink(missing_ok=True)
        if renamed:
            rank_zero_warn(f"{renamed} predictions had an id used before; renamed <id>_2, <id>_3 ...")
        if skipped:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items()))
            rank_zero_warn(f"{sum(skipped.values())} samples skipped and not answered ({reasons})")
        rank_zero_info(f"wrote {len(rows)} predictions to {self.path}")
        return self.path
