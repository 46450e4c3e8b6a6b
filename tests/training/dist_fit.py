"""A tiny LlavaLitModule trained for a few steps on fixed global batches, under one strategy.

Run as a script (Lightning's launcher re-runs it once per extra process), by
tests/training/test_distributed.py: every configuration sees the same global batch each
step, split over ranks and accumulation steps, and writes its per-step losses and final
weights so the test can compare strategies.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.utils.data import DataLoader

from src.data.conversation import IGNORE_INDEX
from src.data.samples import Example
from src.data.stream import collate
from src.training.callbacks import gradient_norm
from src.training.module import FreezeConfig, LlavaLitModule, OptimizerConfig

ROOT = Path(__file__).resolve().parents[2]
GLOBAL_BATCH = 4
IMAGE_TOKENS = 4  # 64 px in 32 px patches


def make_rows(steps: int, equal_lengths: bool, image_id: int, nan_row: int = -1) -> list[Example]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(steps * GLOBAL_BATCH):
        answer = 6 if equal_lengths else 2 + (i * 5) % 9  # supervised tokens vary per row
        text = torch.randint(6, 100, (5 + answer,), generator=g)
        ids = torch.cat([text[:2], torch.full((IMAGE_TOKENS,), image_id), text[2:]])
        labels = ids.clone()
        labels[: len(ids) - answer] = IGNORE_INDEX
        pixels = torch.randn(1, 3, 64, 64, generator=g)
        if i == nan_row:  # a corrupt image: the loss of whichever rank holds it is NaN
            pixels[:] = float("nan")
        rows.append(Example(ids, labels, pixels))
    return rows


class FixedBatches(LightningDataModule):
    """Step s, micro-step j, rank r: its slice of global batch s (contiguous rows)."""

    def __init__(
        self, steps: int, micro: int, accumulate: int, equal_lengths: bool, image_id: int, nan_row: int = -1
    ) -> None:
        super().__init__()
        self.steps, self.micro, self.accumulate = steps, micro, accumulate
        self.rows = make_rows(steps, equal_lengths, image_id, nan_row)

    def train_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        assert self.micro * world * self.accumulate == GLOBAL_BATCH
        batches = []
        for step in range(self.steps):
            batch = self.rows[step * GLOBAL_BATCH : (step + 1) * GLOBAL_BATCH]
            for j in range(self.accumulate):
                chunk = batch[j * self.micro * world : (j + 1) * self.micro * world]
                batches.append(collate(chunk[rank * self.micro : (rank + 1) * self.micro], pad_id=0))
        start = self.trainer.global_step * self.accumulate  # a resumed run goes on with its next batch
        return DataLoader(batches[start:], batch_size=None)  # a bare list would be read as several loaders


class Losses(Callback):
    """The logged `train/loss` of each optimizer step (the module logs it once per step, at its end), and
    the gradient norm the optimizer step starts from (before clipping: what TrainingTelemetry logs)."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self.grad_norms: list[float] = []
        self.synced: list[bool] = []  # per backward: do the (sharded) parameters hold gradients yet
        self.step = 0

    def on_train_start(self, trainer, module) -> None:
        self.step = trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:  # this batch ended an optimizer step
            self.step = trainer.global_step
            self.values.append(float(trainer.callback_metrics["train/loss"]))

    def on_after_backward(self, trainer, module) -> None:
        self.synced.append(any(p.grad is not None for p in module.parameters()))

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:  # a collective under FSDP2: all ranks
        self.grad_norms.append(gradient_norm([p.grad for p in module.parameters() if p.grad is not None]))


def tiny_module() -> LlavaLitModule:
    """The 2-block ViT + 2-layer Llama every configuration trains (seed first for equal weights)."""
    return LlavaLitModule(
        str(ROOT / "data_shards/demo/tokenizer"),
        vision={"name": "vit_tiny_patch16_224", "image_size": 64,
                "kwargs": {"patch_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}},
        llm={"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "num_key_value_heads": 2}},
        freeze=FreezeConfig(vision="full", projector="full", llm="full"),
        optimizer=OptimizerConfig(lr=1e-3, warmup_steps=0, weight_decay=0.01),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["single", "ddp", "fsdp"], required=True)
    parser.add_argument("--micro", type=int, required=True)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--equal-lengths", action="store_true")
    parser.add_argument("--clip", type=float, default=0.0, help="gradient_clip_val (0: none)")
    parser.add_argument("--nan-row", type=int, default=-1, help="this row of all the steps' rows has NaN pixels")
    parser.add_argument("--out", required=True)
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps into OUT-ckpt/")
    parser.add_argument("--resume", default=None, help="checkpoint (file or distributed folder) to resume from")
    args = parser.parse_args()
    seed_everything(0)
    module = tiny_module()
    if args.strategy == "single":
        strategy, devices = "auto", 1
    elif args.strategy == "ddp":
        strategy, devices = "ddp", 2
    else:
        from src.training.sharding import FSDP2Strategy

        strategy, devices = FSDP2Strategy(), 2
    losses = Losses()
    callbacks = [losses]
    if args.save_every:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=args.out + "-ckpt", every_n_train_steps=args.save_every,
                                         save_top_k=-1, filename="{step}"))  # fmt: skip
    trainer = Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=args.steps,
        accumulate_grad_batches=args.accumulate, gradient_clip_val=args.clip or None, logger=False, enable_checkpointing=bool(args.save_every),
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, use_distributed_sampler=False,
    )  # fmt: skip
    data = FixedBatches(
        args.steps, args.micro, args.accumulate, args.equal_lengths, module.image_token_id, args.nan_row
    )
    trainer.fit(module, data, ckpt_path=args.resume)
    if args.strategy == "fsdp":
        state = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = module.model.state_dict()
    if trainer.global_rank == 0:
        torch.save({k: v.detach().cpu() for k, v in state.items()}, args.out + ".pt")
        record = {
            "losses": losses.values,
            "grad_norms": losses.grad_norms,
            "bad_total": module.bad_total,
            "synced": losses.synced,
        }
        Path(args.out + ".json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
