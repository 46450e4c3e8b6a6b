"""A tiny LlavaLitModule fitted for 2 steps at lr 0 with `BenchmarkEval` on fake POPE and MME releases,
under one strategy (single, ddp, fsdp: Lightning's launcher re-runs this script per extra process).

Used by tests/training/test_bench_callback.py. The model's real replies are generated (in lockstep
under FSDP2) and written per rank to OUT-real-<rank>.json; the answers scored are then replaced by
`stub_answer` of the question id, so the scores are not all zero. Rank 0 writes what the callback
logged (OUT.json) and its files stay under OUT-logs/.
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from src.data.datamodule import LlavaDataModule
from src.training.bench_callback import BenchmarkEval
from src.training.module import FreezeConfig, LlavaLitModule, OptimizerConfig

ROOT = Path(__file__).resolve().parents[2]
POOL = ["Yes", "No", "yes", "no", "No.", "maybe", "Yes, there is.", ""]
TINY = {
    "vision": {"name": "vit_tiny_patch16_224", "image_size": 64,
               "kwargs": {"patch_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}},
    "llm": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "num_key_value_heads": 2}},
}  # fmt: skip


def stub_answer(key: str) -> str:
    return POOL[zlib.crc32(key.encode()) % len(POOL)]


def stub_replies(real: dict[str, str]):
    """LlavaLitModule.reply that generates for real (recording the replies) and answers `stub_answer`."""
    original = LlavaLitModule.reply

    def reply(self, batch: dict) -> list[dict]:
        rows = original(self, batch)
        if not batch.get("filler"):
            real.update((row["id"], row["answer"]) for row in rows)
        return [row | {"answer": stub_answer(row["id"])} for row in rows]

    return reply


def build(tokenizer: str, train_shards: list[str], lr: float = 0.0) -> tuple[LlavaLitModule, LlavaDataModule]:
    module = LlavaLitModule(
        tokenizer, freeze=FreezeConfig("full", "full", "full"), optimizer=OptimizerConfig(lr=lr, warmup_steps=0),
        max_new_tokens=4, **TINY,
    )  # fmt: skip
    data = LlavaDataModule(
        train_shards=train_shards, train_view=["mc", "caption"], system_prompt="", batch_size=2, num_workers=0,
        shuffle_buffer=0, samples_per_epoch=8,
    )  # fmt: skip
    return module, data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["single", "ddp", "fsdp"], required=True)
    parser.add_argument("--releases", required=True, help="folder holding the fake releases pope/ and mme/")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    releases = Path(args.releases)
    seed_everything(0)
    module, data = build(
        str(ROOT / "data_shards/demo/tokenizer"), [str(p) for p in sorted((ROOT / "data_shards/demo").glob("train-*"))]
    )
    callback = BenchmarkEval(
        [{"name": "pope", "root": str(releases / "pope"), "limit": 20}, {"name": "mme", "root": str(releases / "mme")}],
        limit=30, every_n_steps=1, batch_size=3,
    )  # fmt: skip
    if args.strategy == "single":
        strategy, devices = "auto", 1
    elif args.strategy == "ddp":
        strategy, devices = "ddp", 2
    else:
        from src.training.sharding import FSDP2Strategy

        strategy, devices = FSDP2Strategy(), 2
    trainer = Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=2, limit_val_batches=0,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        logger=TensorBoardLogger(args.out + "-logs", name="", version=""), callbacks=[callback],
    )  # fmt: skip
    real: dict[str, str] = {}
    LlavaLitModule.reply = stub_replies(real)
    trainer.fit(module, data)
    Path(f"{args.out}-real-{trainer.global_rank}.json").write_text(json.dumps(real, sort_keys=True))
    if trainer.global_rank == 0:
        Path(args.out + ".json").write_text(json.dumps({str(k): v for k, v in callback.results.items()}))


if __name__ == "__main__":
    main()
