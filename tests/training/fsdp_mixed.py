"""Two gloo ranks, one FSDP2-sharded tiny LlavaModel, different kinds of batch on each rank.

Rank 0 holds a text-only batch, rank 1 a batch with images (LLaVA-1.5's stage 2 mixes
text-only ShareGPT samples in, and `modality_length` batching makes whole text-only
batches). Every rank checks the sharded model against an unsharded copy of itself on its own
batch: the training loss, the averaged gradients, multiple-choice scores and generated
replies. Run by tests/training/test_fsdp_mixed.py; writes one JSON per rank.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS.parent), str(TESTS)]


def batch_for(rank: int, image_token_id: int, image_tokens: int) -> dict:
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(10, 60, (3, 16), generator=generator)
    lengths = torch.tensor([16, 11, 7]) if rank == 0 else torch.tensor([9, 16, 13])
    pixels = None
    if rank == 1:  # one image per row, its placeholders first
        ids[:, :image_tokens] = image_token_id
        pixels = torch.randn(3, 3, 64, 64, generator=generator)
    mask = (torch.arange(16)[None] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : image_tokens + 2] = -100
    return {"ids": ids, "mask": mask, "labels": labels, "pixels": pixels, "lengths": lengths}


def run(rank: int, world: int, port: int, out: str) -> None:
    from tiny_models import tiny_lit_module
    from torch.distributed.device_mesh import init_device_mesh

    from src.training.sharding import FSDPConfig, shard_model
    from src.training.stage import FreezeConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    module = tiny_lit_module(
        TESTS.parent / "data_shards" / "demo", layers=2, freeze=FreezeConfig(vision="full", llm="full")
    )
    module.configure_model()
    model = module.model
    reference = copy.deepcopy(model)
    batch = batch_for(rank, model.image_token_id, model.image_tokens)
    ids, mask, labels, pixels, lengths = (batch[k] for k in ("ids", "mask", "labels", "pixels", "lengths"))
    candidates = [[[11, 12], [13]], [[14], [15, 16, 17]], [[18, 19]]]

    def all_done(local: bool) -> bool:
        flag = torch.tensor(0.0 if local else 1.0)
        dist.all_reduce(flag)
        return float(flag) == 0.0

    expected_loss = reference(ids, mask, pixels, labels).loss
    expected_loss.backward()
    expected_grads = {}
    for name, p in reference.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad)  # FSDP averages the ranks' gradients
        expected_grads[name] = grad / world
    expected_scores = reference.score_candidates(ids, lengths, pixels, candidates)
    eos = 2
    max_new = 6 if rank == 0 else 3  # different lengths of generation: ranks step together
    expected_replies = [r.tokens for r in reference.reply(ids, lengths, pixels, max_new, eos)]

    shard_model(model, init_device_mesh("cpu", (world,)), FSDPConfig())
    loss = model(ids, mask, pixels, labels).loss
    loss.backward()
    grad_errors = {
        name: float((p.grad.full_tensor() - expected_grads[name]).abs().max())
        for name, p in model.named_parameters()
        if p.grad is not None
    }
    model.eval()
    scores = model.score_candidates(ids, lengths, pixels, candidates)
    replies = [r.tokens for r in model.reply(ids, lengths, pixels, max_new, eos, all_done=all_done)]
    result = {
        "loss": [loss.item(), expected_loss.item()],
        "grads_checked": len(grad_errors),
        "params": sum(1 for p in model.parameters() if p.requires_grad),
        "max_grad_error": max(grad_errors.values()),
        "max_grad": max(float(g.abs().max()) for g in expected_grads.values()),
        "scores_error": float((scores - expected_scores).nan_to_num(posinf=0, neginf=0).abs().max()),
        "replies": [replies, expected_replies],
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    port, out = int(sys.argv[1]), sys.argv[2]
    mp.spawn(run, args=(2, port, out), nprocs=2)
