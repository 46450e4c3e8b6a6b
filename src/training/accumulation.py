"""One optimizer step weights every supervised token of its global batch equally, however the
batch is split over data-parallel ranks and accumulation micro-batches.

A micro-batch's loss is the mean over its own supervised tokens. Lightning divides each
micro-batch's loss by `accumulate_grad_batches`, and DDP / FSDP average gradients over
ranks: with micro-batches of unequal token counts, that average of means weights a token of
a short micro-batch more than one of a long micro-batch. The big batch (and transformers'
Trainer, through `num_items_in_batch`) takes the mean over all of the step's tokens.

The step's token count is known only after its last micro-batch, so each micro-batch
backpropagates its token *sum* times one constant of the window, `ranks / first` (`first`:
the global token count of the window's first micro-batch, so gradients keep the scale of a
mean and fp16's loss scaler needs no new range), and once the last backward is done the
gradients are multiplied by `accumulate x first / tokens of the window`. That happens inside
the optimizer's closure (`LlavaLitModule.optimizer_step`), before anything reads the
gradients: Lightning runs the callbacks' `on_before_optimizer_step` (the gradient norm of
`TrainingTelemetry`), then the module's, then clipping, then the optimizer, all after the
closure. Without accumulation on one process the factor is exactly 1 and nothing is rescaled.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class TokenWindow:
    """The supervised tokens and loss of the micro-batches since the last optimizer step."""

    def __init__(self) -> None:
        self.first: float | None = None
        """Global supervised tokens of the window's first backpropagated micro-batch (at least 1)."""
        self.tokens = 0
        """This rank's supervised tokens in the window."""
        self.loss_sum: torch.Tensor | None = None
        """This rank's summed token losses in the window (detached), for the logged loss."""

    def weight(self, mean_loss: torch.Tensor, tokens: int, step_tokens: float, ranks: int) -> float:
        """The factor of a micro-batch's mean loss to backpropagate: `tokens x ranks / first`.

        `step_tokens` is the micro-batch's supervised tokens over all ranks; only the first
        micro-batch's count is used.
        """
        if self.first is None:
            self.first = max(float(step_tokens), 1.0)
        self.tokens += tokens
        loss_sum = mean_loss.detach().double() * tokens
        self.loss_sum = loss_sum if self.loss_sum is None else self.loss_sum + loss_sum
        return tokens * ranks / self.first

    def local_stats(self, device: torch.device) -> torch.Tensor:
        """(summed token losses, supervised tokens) of this rank, in float64, to be summed over ranks."""
        loss = self.loss_sum if self.loss_sum is not None else torch.zeros((), dtype=torch.float64)
        return torch.stack([loss.to(device), torch.tensor(float(self.tokens), dtype=torch.float64, device=device)])

    def gradient_factor(self, window_tokens: float, accumulate: int) -> float:
        """What turns the accumulated gradients into the window's token mean: Lightning divided each
        micro-batch by `accumulate` and the ranks' average by `ranks`; the micro-batches were
        weighted `ranks / first` per token. 1.0 when nothing was backpropagated or supervised."""
        if self.first is None or window_tokens <= 0:
            return 1.0
        return accumulate * self.first / window_tokens


def scale_gradients(parameters: Iterable[torch.nn.Parameter], factor: float) -> int:
    """Multiplies every gradient by `factor` in place; returns how many.

    Plain gradients take one `_foreach_mul_`; FSDP2's DTensor gradients (the local shard of a
    reduce-scattered gradient) are multiplied one by one, a local pointwise op without
    communication. AdamW, fused or not, then reads the scaled `.grad` as any other.
    """
    plain, distributed = [], []
    for param in parameters:
        if param.grad is not None:
            (distributed if hasattr(param.grad, "device_mesh") else plain).append(param.grad)
    if plain:
        torch._foreach_mul_(plain, factor)
    for grad in distributed:
        grad.mul_(factor)
    return len(plain) + len(distributed)
