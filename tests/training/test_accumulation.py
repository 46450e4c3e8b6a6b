"""Gradient accumulation weights every supervised token of the optimizer step equally: micro-batches
of unequal token counts give the big batch's logged loss, gradient norm, clipped gradients and
weights (2-process DDP / FSDP2 with accumulation: tests/training/test_distributed.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_fit import make_rows, tiny_module
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from src.data.stream import collate
from src.training.accumulation import TokenWindow, scale_gradients
from src.training.callbacks import TrainingTelemetry
from src.training.module import LlavaLitModule

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[2]
STEPS = 2
CLIP = 0.05  # far below the gradient norms here: clipping acts on every step, so it must see the right norm


class MemoryLogger(Logger):
    """What Lightning and the telemetry callback hand to loggers, per step."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def series(self, tag: str) -> list[float]:
        return [float(metrics[tag]) for _, metrics in self.rows if tag in metrics]


class Gradients(Callback):
    """The gradients every on_before_optimizer_step callback (the telemetry's norm) sees, per step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append({n: p.grad.clone() for n, p in pl_module.model.named_parameters() if p.grad is not None})


def tiny() -> LlavaLitModule:
    torch.manual_seed(0)
    return tiny_module()


def fit(steps: list[list[list[int]]], poisoned: frozenset[tuple[int, int]] = frozenset()):
    """steps[s][j]: the rows (of `make_rows`) of micro-batch j of optimizer step s; a (s, j) in
    `poisoned` gets a NaN pixel. Returns the logger, the gradients per step and the final weights."""
    module = tiny()
    rows = make_rows(1, equal_lengths=False, image_id=module.image_token_id)
    batches = []
    for s, micro in enumerate(steps):
        for j, picked in enumerate(micro):
            batch = collate([rows[i] for i in picked], pad_id=0)
            if (s, j) in poisoned:
                batch["pixel_values"][0, 0, 0, 0] = float("nan")
            batches.append(batch)
    accumulate = {len(micro) for micro in steps}
    assert len(accumulate) == 1
    logger, grads = MemoryLogger(), Gradients()
    trainer = Trainer(
        accelerator="cpu", max_steps=len(steps), accumulate_grad_batches=accumulate.pop(), gradient_clip_val=CLIP,
        logger=logger, log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[grads, TrainingTelemetry(log_every_n_steps=1)],
    )  # fmt: skip
    trainer.fit(module, DataLoader(batches, batch_size=None))
    assert trainer.global_step == len(steps)
    return logger, grads.steps, {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def assert_same_run(run, reference) -> None:
    (logger, grads, weights), (ref_logger, ref_grads, ref_weights) = run, reference
    for tag in ("train/loss", "perf/grad_norm", "train/supervised_tokens"):
        values, expected = logger.series(tag), ref_logger.series(tag)
        assert len(values) == len(expected) == STEPS, tag
        assert values == pytest.approx(expected, rel=1e-5, abs=1e-6), tag
    assert len(grads) == len(ref_grads) == STEPS
    for step, ref_step in zip(grads, ref_grads, strict=True):
        assert step.keys() == ref_step.keys()
        for name, grad in step.items():
            torch.testing.assert_close(grad, ref_step[name], rtol=1e-5, atol=1e-7, msg=name)
    assert weights.keys() == ref_weights.keys()
    worst = max(float((weights[k] - ref_weights[k]).abs().max()) for k in weights)
    assert worst <= 1e-5, worst


@pytest.fixture(scope="module")
def big_batches():
    """Two steps of 4 rows each, one micro-batch per step. Rows 0-3 hold 2, 7, 3, 8 supervised tokens."""
    return fit([[[0, 1, 2, 3]], [[3, 2, 1, 0]]])


@pytest.mark.parametrize(
    "steps",
    [
        [[[0, 1], [2, 3]], [[3, 2], [1, 0]]],  # 9 and 11 tokens per micro-batch
        [[[0], [1], [2], [3]], [[3], [2], [1], [0]]],  # 2, 7, 3, 8
        [[[1, 3, 2], [0]], [[3], [2, 1, 0]]],  # 18 and 2, then 8 and 12: padded to different lengths
    ],
    ids=["2x2", "4x1", "3+1"],
)
def test_accumulated_micro_batches_of_unequal_tokens_equal_the_big_batch(big_batches, steps):
    """Logged loss and token count, the gradient norm the telemetry logs, the gradients callbacks see
    (before clipping) and the weights after two clipped AdamW steps: the big batch's, to 1e-5. With
    the mean of micro-batch means (Lightning's plain accumulation) none of them is."""
    assert_same_run(fit(steps), big_batches)


def test_a_skipped_micro_batch_leaves_the_token_mean_of_the_others():
    """A non-finite micro-batch drops out of its window: that step is the token mean of the rest."""
    accumulated = fit([[[0, 1], [2, 3]], [[3, 2], [1, 0]]], poisoned=frozenset({(0, 1)}))
    assert_same_run(accumulated, fit([[[0, 1]], [[3, 2, 1, 0]]]))


def test_the_window_factor_undoes_the_means_and_weights_tokens():
    """The arithmetic on its own: micro-batches of 3 and 1 tokens on one rank, accumulate 2."""
    window = TokenWindow()
    assert window.gradient_factor(0.0, 2) == 1.0  # nothing backpropagated: nothing to rescale
    assert window.weight(torch.tensor(2.0), 3, 3.0, 1) == 1.0  # the first micro-batch is a plain mean
    assert window.weight(torch.tensor(4.0), 1, 1.0, 1) == pytest.approx(1 / 3)  # its sum / first's tokens
    stats = window.local_stats(torch.device("cpu"))
    assert stats.tolist() == [2.0 * 3 + 4.0 * 1, 4.0]  # token losses summed, tokens counted
    # Lightning halved both; the factor turns (mean_0 + 1/3 sum_1) / 2 into (sum_0 + sum_1) / 4
    assert window.gradient_factor(4.0, 2) == pytest.approx(2 * 3 / 4)
    weights = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(1))]
    weights[0].grad = torch.tensor([1.0, -2.0])
    assert scale_gradients(weights, 1.5) == 1 and weights[0].grad.tolist() == [1.5, -3.0]
