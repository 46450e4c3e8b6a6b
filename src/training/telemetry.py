"""`TrainingTelemetry`: is this run healthy and is it using the hardware.

Per optimizer step the learning rate of every parameter group, the gradient norm, real tokens
(padding excluded), image placeholder tokens, samples and image views per second, the share of
time spent waiting for data, peak memory, and the MFU from the FLOPs model (`src.training.flops`).
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from src.core.constants import IGNORE_INDEX, PARTS
from src.training.flops import FlopsModel, flops_model_of, mfu, peak_flops_of

# ---- gradient norm ------------------------------------------------------------------------


def gradient_norm(grads: Iterable[torch.Tensor]) -> float:
    """Total L2 norm of gradients, plain tensors or FSDP2 DTensor shards alike.

    Each group (plain tensors; DTensors per device mesh) takes `torch.nn.utils.get_total_norm`,
    which on DTensor shards gives a partial norm that `full_tensor()` reduces over the mesh:
    one collective per mesh, whatever the number of parameters. Plain gradients are whole on
    every rank (DDP has already averaged them), so their norm is local; FSDP1's flat shards
    are plain tensors too, and would give this rank's shard alone (the kit shards with FSDP2).
    Every rank must call this at the same step when a DTensor is involved.
    """
    groups: dict[object, list[torch.Tensor]] = {}
    for grad in grads:
        mesh = getattr(grad, "device_mesh", None)
        groups.setdefault(id(mesh) if mesh is not None else None, []).append(grad)
    squares = 0.0
    for tensors in groups.values():
        norm = torch.nn.utils.get_total_norm(tensors, 2.0)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        squares += float(norm) ** 2
    return math.sqrt(squares)


# ---- per-batch counts ---------------------------------------------------------------------


@dataclass
class BatchCounts:
    """What one batch holds: real tokens (padding excluded), examples, image views, image
    placeholder tokens and the sums the FLOPs model needs.

    Image tokens are counted from the batch's placeholders, not as views x tokens per view: under
    anyres with unpad (LLaVA-NeXT) an image takes the tokens its size leaves after unpadding, plus
    a newline per row (`src.model.anyres`), fewer than its views' tokens.
    """

    tokens: int
    samples: int
    images: int
    squared_lengths: int
    supervised: int
    image_tokens: int = 0

    @classmethod
    def of(cls, batch: Mapping, image_token_id: int | None = None) -> BatchCounts:
        """A padded batch's lengths are its `attention_mask` rows; a packed one (no mask) lists
        its examples' lengths per row in `seq_lens`; without either every position is real.
        `image_token_id`: the placeholder counted as image tokens (None: none counted)."""
        input_ids = batch.get("input_ids")
        if input_ids is None:  # a reader's skip-only batch
            return cls(0, 0, 0, 0, 0)
        pixels, labels = batch.get("pixel_values"), batch.get("labels")
        mask, seq_lens = batch.get("attention_mask"), batch.get("seq_lens")
        images = 0 if pixels is None else int(pixels.shape[0])
        sums = [(input_ids == image_token_id).sum() if image_token_id is not None else input_ids.new_zeros(())]
        sums += [] if labels is None else [(labels[:, 1:] != IGNORE_INDEX).sum()]
        if mask is not None:
            lengths = mask.long().sum(dim=1)
            sums += [lengths.sum(), (lengths * lengths).sum()]
        values = [int(v) for v in torch.stack(sums).tolist()]  # one device sync for all
        image_tokens = values[0]
        supervised = values[1] if labels is not None else 0
        if mask is not None:
            return cls(values[-2], int(input_ids.shape[0]), images, values[-1], supervised, image_tokens)
        if seq_lens is not None:
            flat = [int(n) for row in seq_lens for n in row]
        else:
            flat = [int(input_ids.shape[1])] * int(input_ids.shape[0])
        return cls(sum(flat), len(flat), images, sum(n * n for n in flat), supervised, image_tokens)

    @classmethod
    def total(cls, counts: Iterable[BatchCounts]) -> BatchCounts:
        """The counts of several batches together (the micro-batches of one optimizer step)."""
        counts = list(counts)
        return cls(*(sum(getattr(c, name) for c in counts) for name in cls.__dataclass_fields__))


@dataclass
class _Step:
    seconds: float
    wait: float
    counts: BatchCounts
    flops: float


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory in GB (1e9 bytes): allocated tensors on a GPU (since `on_train_start`); on a
    CPU the process's peak resident set size, everything the process ever held at once."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024) / 1e9  # bytes on macOS, KiB on Linux


class TrainingTelemetry(Callback):
    """Per optimizer step: throughput, data wait, memory, gradient norm, learning rates, MFU.

    Logged every `log_every_n_steps` optimizer steps, at the step Lightning logs `train/loss`
    of the same step (so the curves line up):

    - `perf/tokens_per_s`, `perf/samples_per_s`, `perf/images_per_s`: real tokens (padding
      excluded; image placeholders included, the LLM runs them), examples (a packed row holds
      several) and image views, over all ranks, per second of the window;
    - `perf/image_tokens_per_s`, `perf/image_tokens_per_sample`: image placeholder tokens (the
      module's `image_token_id`, counted in the batch: right for anyres, whose images take as
      many tokens as their size leaves, not views x tokens per view) per second and per example;
    - `perf/step_time_s`, `perf/tokens_per_step`: their mean per step, so that
      tokens_per_s = tokens_per_step / step_time_s;
    - `perf/data_wait_s` and `perf/data_wait_fraction`: the time from one batch's end to the
      next one's start, when the loop waits for the loader, per step and as a share of the
      step. Validation runs are left out; the logging and checkpoint writes that Lightning
      does between steps count as waiting;
    - `perf/peak_memory_gb` (see `peak_memory_gb`), `perf/grad_norm` (before clipping: Lightning
      clips after `on_before_optimizer_step`; of the step's token-mean gradients, which
      `LlavaLitModule` sets inside the optimizer's closure, before this hook), `lr/<group name>`
      per parameter group;
    - `perf/tflops_per_s_per_device` (model FLOPs, `flops_model`; achieved, not peak), and
      `perf/mfu` when a peak is known (`peak_flops`, `peak_table`, or the device's row of
      `PEAK_FLOPS`; none on a CPU unless given).

    A step whose optimizer step Lightning skips (the module returns None for a non-finite
    loss) logs no gradient norm.

    `tok/s` goes on the progress bar (the loss is there already: the module logs it).
    On a GPU each step ends with a device synchronisation: without it the CPU runs ahead of
    the GPU, a step's time would be its kernel launches and the "wait" would overlap compute;
    with it the wait is time the GPU sits idle. It costs the overlap of the next fetch with
    the step's last kernels, small beside a step (counting the batch's tokens at its start
    would wait for the GPU anyway).
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        peak_flops: float | None = None,
        dtype: str = "bf16",
        window: int | None = None,
        peak_table: dict[str, float] | None = None,
    ) -> None:
        """
        Args:
            log_every_n_steps: optimizer steps between logs; default: the trainer's `log_every_n_steps`.
            peak_flops: peak FLOP/s of one device; overrides the table (and gives MFU on a CPU).
            dtype: the compute dtype the table is read for: `bf16`, `fp16`, `fp8`, `tf32`, `fp32`.
            window: steps the rates are averaged over; default: every step since the last log.
            peak_table: more peak FLOP/s by device-name substring (`{"rtx 4090": 165e12}`), looked
                at before the built-in table.
        """
        super().__init__()
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be at least 1, got {log_every_n_steps}")
        if window is not None and window < 1:
            raise ValueError(f"window must be at least 1 step, got {window}")
        if dtype not in {"bf16", "fp16", "fp8", "tf32", "fp32"}:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of bf16, fp16, fp8, tf32, fp32")
        self.log_every_n_steps = log_every_n_steps
        self.peak_flops = peak_flops
        self.dtype = dtype
        self.window = window
        self.peak_table = dict(peak_table or {})
        self.steps: deque[_Step] = deque(maxlen=window)
        self.flops: FlopsModel | None = None
        self.image_token_id: int | None = None
        self.device_peak: float | None = None
        self._last_end: float | None = None
        self._batch_start = 0.0
        self._pending_wait = 0.0
        self._paused = False
        self._step_seconds = 0.0
        self._step_wait = 0.0
        self._step_counts: list[BatchCounts] = []
        self._stepped_at = 0
        self._grad_norm: float | None = None
        self._lrs: dict[str, float] = {}
        self._bar: float | None = None

    def _every(self, trainer: Trainer) -> int:
        return self.log_every_n_steps or max(1, trainer.log_every_n_steps)

    def _now(self, pl_module: LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        self.flops = flops_model_of(pl_module) if all(hasattr(model, p) for p in PARTS) else None
        self.image_token_id = getattr(pl_module, "image_token_id", None)
        device = pl_module.device
        if self.peak_flops is not None:
            self.device_peak = float(self.peak_flops)
        elif device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            self.device_peak = peak_flops_of(name, self.dtype, self.peak_table)
            if self.device_peak is None:
                rank_zero_warn(f"no peak FLOP/s for {name!r} in {self.dtype}: set peak_flops for perf/mfu")
            torch.cuda.reset_peak_memory_stats(device)
        self._stepped_at = trainer.global_step

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_end = self._now(pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Validation inside fit is no step and no data wait: the clock stops until it ends."""
        if self._last_end is not None:
            self._pending_wait += time.perf_counter() - self._last_end  # the gap before it still counts
            self._last_end = None
            self._paused = True

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._paused:
            self._last_end = time.perf_counter()
            self._paused = False

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self._step_wait += self._pending_wait + now - self._last_end
        self._pending_wait = 0.0
        self._batch_start = now
        self._step_counts.append(BatchCounts.of(batch, self.image_token_id))

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if (trainer.global_step + 1) % self._every(trainer):
            return
        grads = [p.grad for p in pl_module.parameters() if p.requires_grad and p.grad is not None]
        self._grad_norm = gradient_norm(grads) if grads else None
        several = len(trainer.optimizers) > 1
        index = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), 0)
        for i, group in enumerate(optimizer.param_groups):
            name = group.get("name", f"group{i}")
            self._lrs[f"lr/opt{index}/{name}" if several else f"lr/{name}"] = float(group["lr"])

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        now = self._now(pl_module)
        self._step_seconds += now - self._batch_start
        self._last_end = now
        if trainer.global_step == self._stepped_at:  # accumulating gradients: the step goes on
            return
        self._stepped_at = trainer.global_step
        total = BatchCounts.total(self._step_counts)
        flops = 0.0
        if self.flops is not None:
            flops = self.flops.step_flops(total.tokens, total.squared_lengths, total.supervised, total.images)
        self.steps.append(_Step(self._step_seconds + self._step_wait, self._step_wait, total, flops))
        self._step_seconds = self._step_wait = 0.0
        self._step_counts = []
        if trainer.global_step % self._every(trainer) == 0:
            self._log(trainer, pl_module)
        if self._bar is not None:
            pl_module.log("tok/s", self._bar, prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1)

    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        steps = list(self.steps)
        if self.window is None:
            self.steps.clear()
        seconds = max(sum(s.seconds for s in steps), 1e-9)
        fields = ("tokens", "samples", "images", "image_tokens")
        local = [sum(float(getattr(s.counts, f)) for s in steps) for f in fields]
        local.append(sum(s.flops for s in steps))
        totals = torch.tensor(local, dtype=torch.float64, device=pl_module.device)
        if trainer.world_size > 1:  # the whole job's counts; every rank is here at the same step
            totals = trainer.strategy.reduce(totals, reduce_op="sum")
        tokens, samples, images, image_tokens, flops = totals.tolist()
        metrics = {
            "perf/step_time_s": seconds / len(steps),
            "perf/tokens_per_step": tokens / len(steps),
            "perf/tokens_per_s": tokens / seconds,
            "perf/samples_per_s": samples / seconds,
            "perf/images_per_s": images / seconds,
            "perf/image_tokens_per_s": image_tokens / seconds,
            "perf/image_tokens_per_sample": image_tokens / max(samples, 1.0),
            "perf/data_wait_s": sum(s.wait for s in steps) / len(steps),
            "perf/data_wait_fraction": sum(s.wait for s in steps) / seconds,
            "perf/peak_memory_gb": peak_memory_gb(pl_module.device),
            **self._lrs,
        }
        if self._grad_norm is not None:
            metrics["perf/grad_norm"] = self._grad_norm
        if self.flops is not None:
            metrics["perf/tflops_per_s_per_device"] = flops / seconds / trainer.world_size / 1e12
            if self.device_peak:
                metrics["perf/mfu"] = mfu(flops, seconds, self.device_peak, trainer.world_size)
        self._bar = metrics["perf/tokens_per_s"]
        self._grad_norm = None
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step - 1)  # where Lightning logs this step's loss


__all__ = ["BatchCounts", "TrainingTelemetry", "gradient_norm", "peak_memory_gb"]
