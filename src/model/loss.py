"""Cross-entropy over the vocabulary in chunks of positions, so the whole logits tensor never exists.

A vocabulary of 32k (Llama 2) to 128k+ (Llama 3, Qwen) rows makes the logits of a batch the
largest tensor of a training step: (positions x vocab) in the head's dtype, again in
float32 for the loss, and kept until backward (cross-entropy saves its softmax). Even with
logits only at supervised positions (`LlavaModel.supervised_loss`), a batch of long replies
makes gigabytes of them.

Here the positions are cut into chunks. Each chunk's logits are computed, reduced to a
summed loss, and dropped: the chunk runs under activation checkpointing (non-reentrant),
so nothing of it is kept for backward but its inputs, and backward recomputes one chunk's
logits at a time. The price is one more forward of the output head over the supervised
positions (2 x hidden x vocab FLOPs per supervised token, a third of the head's training
cost, and only where logits are needed at all), paid only when there is more than one
chunk. The value is the mean over all positions,
as `F.cross_entropy(logits.float(), targets)` gives, and so is the gradient: only the order
of the floating-point sums differs.

`logits_fn` is whatever turns hidden states into logits (`src.model.language.lm_logits`), so
soft-capping, hooks on the head (hidden padded rows), LoRA on the head and FSDP's unsharded
weights all apply unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_SIZE = 1024
"""Positions per chunk: 1024 x 32k vocab is 128 MiB of float32 logits, large enough for full-speed matmuls."""


def _chunk_loss_sum(logits_fn: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor):
    return F.cross_entropy(logits_fn(hidden).float(), targets, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    checkpoint_chunks: bool = True,
) -> torch.Tensor:
    """Mean cross-entropy of `logits_fn(hidden)` (computed in float32) against `targets`.

    Args:
        hidden: (positions, hidden) decoder states, every position supervised.
        targets: (positions,) token ids; no ignore index (select the supervised positions first).
        logits_fn: hidden states -> logits, e.g. `partial(lm_logits, llm)`.
        chunk_size: positions per chunk.
        checkpoint_chunks: recompute each chunk's logits in backward instead of keeping them
            (the point of chunking; off, the chunks' logits are all kept for backward, as an
            unchunked loss keeps them). Positions that fit one chunk are never recomputed:
            the peak (the decoder's activations and one chunk of logits, when backward
            starts) would be the same.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"expected hidden (N, H) and targets (N,), got {tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    count = hidden.shape[0]
    if count == 0:
        raise ValueError("no positions to take the loss over")
    # one chunk's logits coexist with all the decoder's activations either way: recomputing pays only for several
    recompute = checkpoint_chunks and count > chunk_size and torch.is_grad_enabled() and hidden.requires_grad
    total = None
    for start in range(0, count, chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if recompute:
            part = checkpoint(_chunk_loss_sum, logits_fn, h, t, use_reentrant=False)
        else:
            part = _chunk_loss_sum(logits_fn, h, t)
        total = part if total is None else total + part
    return total / count
