"""A training stream resumed mid-epoch with several ranks goes on with exactly the batches an
uninterrupted run reads, in that epoch and the next (the SLURM requeue test found a batch skipped
at the next epoch: the epoch's rest was judged over all ranks' batches, not one rank's)."""

from __future__ import annotations

import torch

from src.data.datamodule import LlavaDataModule
from tests.data.test_datamodule import fake_trainer

WORLD = 2


def datamodule(demo_dir, tokenizer, image_transform, rank: int) -> LlavaDataModule:
    dm = LlavaDataModule(
        train_shards=f"{demo_dir}/train-{{000000..000003}}.tar", batch_size=4, num_workers=0,
        shuffle_buffer=3, system_prompt="", seed=1,
    )  # fmt: skip
    dm.trainer = fake_trainer(tokenizer, image_transform, rank=rank, world=WORLD)
    dm.trainer.training = True  # batches carry their reader's position only while training
    return dm


def epochs(dm: LlavaDataModule, count: int) -> list[list[dict]]:
    """`count` epochs of the rank's training loader, each batch as the trainer hands it on."""
    loader = dm.train_dataloader()
    return [[dm.on_before_batch_transfer(batch, 0) for batch in loader] for _ in range(count)]


def same(a: dict, b: dict) -> bool:
    return torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def test_two_ranks_resumed_mid_epoch_read_what_an_uninterrupted_run_reads(demo_dir, tokenizer, image_transform):
    straight = [epochs(datamodule(demo_dir, tokenizer, image_transform, rank), 2) for rank in range(WORLD)]
    per_epoch = len(straight[0][0])
    assert per_epoch == 40 // (4 * WORLD) == 5
    # every rank stops after 3 of its 5 batches (6 over the ranks: more than one rank's epoch); rank 0 writes the state
    states = []
    for rank in range(WORLD):
        dm = datamodule(demo_dir, tokenizer, image_transform, rank)
        loader = iter(dm.train_dataloader())
        for _ in range(3):
            dm.on_before_batch_transfer(next(loader), 0)
        states.append(dm.state_dict())
    gathered = dict(states[0])
    gathered["positions"] = {k: v for s in states for k, v in s["positions"].items()}
    gathered["epoch_used"] = {k: v for s in states for k, v in s["epoch_used"].items()}
    for rank in range(WORLD):
        dm = datamodule(demo_dir, tokenizer, image_transform, rank)
        dm.load_state_dict(gathered)
        rest, following = epochs(dm, 2)
        assert len(rest) == per_epoch - 3  # the epoch's rest, then whole epochs
        assert all(same(a, b) for a, b in zip(rest, straight[rank][0][3:], strict=True))
        assert all(same(a, b) for a, b in zip(following, straight[rank][1], strict=True))
