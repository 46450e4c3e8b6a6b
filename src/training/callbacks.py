"""Training telemetry and sample generations, as Lightning callbacks.

`TrainingTelemetry` answers "is this run healthy and is it using the hardware": per
optimizer step the learning rate of every parameter group, the gradient norm, real tokens
(padding excluded), samples and image views per second, the share of time spent waiting
for data, peak memory, and the model FLOPs utilisation (MFU) from a FLOPs model that knows
which parts of a LLaVA model train (`flops_model`). `SampleGenerations` answers "what does
it say": every few validations it logs a few validation images with the model's greedy
answer and the reference, to TensorBoard.
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
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from src.data.conversation import IGNORE_INDEX, IMAGE_TAG

# ---- peak FLOP/s --------------------------------------------------------------------------

PEAK_FLOPS: dict[str, dict[str, float]] = {
    # dense tensor-core FLOP/s per GPU from NVIDIA's datasheets; the sheets' headline numbers
    # assume 2:4 sparsity and are twice these. H200 computes as H100 SXM (989 dense bf16):
    # Lightning's own table lists H200 at its sparse 2e15, and does not know torch's plain
    # "NVIDIA H200" name, nor the L40S (its "l4" match takes it for an L4).
    "h100 sxm": {"bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "h100 pcie": {"bf16": 756.0e12, "fp16": 756.0e12, "fp8": 1513.0e12, "tf32": 378.0e12, "fp32": 51.2e12},
    "h100 nvl": {"bf16": 835.5e12, "fp16": 835.5e12, "fp8": 1670.5e12, "tf32": 417.5e12, "fp32": 60.0e12},
    "h200": {"bf16": 989.5e12, "fp16": 989.5e12, "fp8": 1979.0e12, "tf32": 494.5e12, "fp32": 67.0e12},
    "h200 nvl": {"bf16": 835.5e12, "fp16": 835.5e12, "fp8": 1670.5e12, "tf32": 417.5e12, "fp32": 60.0e12},
    "a100": {"bf16": 312.0e12, "fp16": 312.0e12, "tf32": 156.0e12, "fp32": 19.5e12},  # 40 and 80 GB, SXM and PCIe
    "l40s": {"bf16": 362.05e12, "fp16": 362.05e12, "fp8": 733.0e12, "tf32": 183.0e12, "fp32": 91.6e12},
}


def chip_of(device_name: str) -> str | None:
    """The `PEAK_FLOPS` row for a name as `torch.cuda.get_device_name` reports it, or None.

    "NVIDIA H100 80GB HBM3" is the SXM board, "NVIDIA H100 PCIe" (or an HBM2e one) the PCIe
    card; "NVIDIA GH200 480GB" has an H100's or H200's compute, so it reads as an H200.
    """
    name = device_name.lower()
    if "h200" in name:
        return "h200 nvl" if "nvl" in name else "h200"
    if "h100" in name:
        if "nvl" in name:
            return "h100 nvl"
        return "h100 pcie" if "pcie" in name or "hbm2e" in name else "h100 sxm"
    if "a100" in name:
        return "a100"
    if "l40s" in name:
        return "l40s"
    return None


def peak_flops_of(device_name: str, dtype: str = "bf16", table: Mapping[str, float] | None = None) -> float | None:
    """Dense peak FLOP/s of one device for `dtype`, or None when unknown.

    `table` (name substring -> FLOP/s, from YAML) is looked at first, so any card can be added
    or a number corrected without code.
    """
    name = device_name.lower()
    for key, flops in (table or {}).items():
        if key.lower() in name:
            return float(flops)
    chip = chip_of(device_name)
    if chip is None:
        return None
    return PEAK_FLOPS[chip].get(dtype)


# ---- the FLOPs model ----------------------------------------------------------------------


@dataclass(frozen=True)
class FlopsModel:
    """Training FLOPs of one LLaVA step, split by what each term scales with.

    Attributes:
        per_token: LLM FLOPs per token it runs (text and image placeholders alike), without
            attention and the output head.
        per_supervised_token: output-head FLOPs per supervised token; the model computes
            logits only there (`LlavaModel.supervised_loss`).
        attention: attention FLOPs per token per token of its example: an example of length
            s costs `attention * s * s`.
        per_view: vision tower and projector FLOPs per image view.
    """

    per_token: float
    per_supervised_token: float
    attention: float
    per_view: float

    def step_flops(self, tokens: float, squared_lengths: float, supervised: float, views: float) -> float:
        """FLOPs of a step from its counts; `squared_lengths` is the sum of its examples' squared lengths."""
        return (
            tokens * self.per_token
            + squared_lengths * self.attention
            + supervised * self.per_supervised_token
            + views * self.per_view
        )

    def per_token_at(self, seq_len: float, views_per_token: float = 0.0, supervised_fraction: float = 1.0) -> float:
        """FLOPs per token for examples of `seq_len` tokens, with the image views amortised over the tokens."""
        return (
            self.per_token
            + self.attention * seq_len
            + self.per_supervised_token * supervised_fraction
            + self.per_view * views_per_token
        )


def flops_model(
    counts: Mapping[str, tuple[int, int]],
    *,
    layers: int,
    hidden: int,
    llm_mode: str = "full",
    trained_layers: int = 0,
    tower_tokens: int = 0,
    image_tokens: int = 0,
) -> FlopsModel:
    """The FLOPs model of a LLaVA model from its parameter counts.

    A parameter costs 2 FLOPs per token it meets forward (a multiply and an add), 2 more
    backward for the gradient of its input, and 2 more for its own gradient. So per part:

    - 6N if its parameters train;
    - 4N if frozen but the gradient flows through it to a trained part below (the LLM when
      the projector or the tower trains; a LoRA LLM's base, since its adapters sit in every
      layer: base 4N + adapter 6N);
    - 2N if frozen at the input (a frozen tower runs without autograd; the frozen lower
      layers of a `partial` part when nothing below them trains).

    Attention (the score and value products, which have no parameters) costs 4 x hidden
    FLOPs per layer per token of context forward, 3x that when the backward passes through
    the layer: 12 x layers x hidden x s per token in the usual case (PaLM's count, causal
    masking not halved). The LLM runs every token (image placeholders included); its output
    head only the supervised ones. The tower runs per image view, not per text token: its N_v
    parameters meet `tower_tokens` tokens per view, the projector's N_p its `image_tokens`
    output tokens (exact for linear, mlp and pixel_shuffle; an approximation for the
    resampler and the convolutional projectors). The tower's own attention is left out: it
    adds 2 x depth x width x tokens / N_v per token, under a tenth for CLIP ViT-L/336.

    Args:
        counts: (trainable, all) parameters of `vision`, `projector`, `llm` (its body: without
            the input embeddings, a lookup that costs no FLOPs, and without the output head)
            and `head` (the output projection; absent: none).
        layers: decoder layers of the LLM.
        hidden: hidden size of the LLM.
        llm_mode: the LLM's freeze mode (`full`, `frozen`, `lora`, `partial`).
        trained_layers: decoder layers that train under `partial` (the last ones).
        tower_tokens: tokens the tower runs per view.
        image_tokens: tokens the projector makes of a view.
    """
    v_trained, v_all = counts.get("vision", (0, 0))
    p_trained, p_all = counts.get("projector", (0, 0))
    l_trained, l_all = counts["llm"]
    h_trained, h_all = counts.get("head", (0, 0))
    anything_trains = any(t > 0 for t, _ in counts.values())
    below_llm = v_trained > 0 or p_trained > 0
    vision = 6 * v_trained + 2 * (v_all - v_trained)  # nothing is below the tower
    projector = 6 * p_trained + (4 if v_trained else 2) * (p_all - p_trained)
    through = below_llm or llm_mode == "lora"
    body = 6 * l_trained + (4 if through else 2) * (l_all - l_trained)
    head = 6 * h_trained + (4 if anything_trains else 2) * (h_all - h_trained)  # above every other part
    if below_llm or llm_mode in ("full", "lora"):
        backward_layers = layers
    elif llm_mode == "partial":
        backward_layers = min(trained_layers, layers)
    else:
        backward_layers = 0
    attention = 4 * hidden * (layers + 2 * backward_layers)
    return FlopsModel(
        per_token=float(body),
        per_supervised_token=float(head),
        attention=float(attention),
        per_view=float(vision * tower_tokens + projector * image_tokens),
    )


def _numel(param: torch.Tensor) -> int:
    """Elements a parameter computes with: a 4-bit quantised weight stores two per byte."""
    state = getattr(param, "quant_state", None)
    return int(state.shape.numel()) if state is not None and hasattr(state, "shape") else param.numel()


def _count(params: Iterable[torch.Tensor]) -> tuple[int, int]:
    params = list(params)
    return sum(_numel(p) for p in params if p.requires_grad), sum(_numel(p) for p in params)


def flops_model_of(module: LightningModule) -> FlopsModel:
    """`flops_model` of an `LlavaLitModule` as built and frozen.

    Counts its parameters itself rather than through `parameter_counts()`: the input
    embeddings (a lookup), the output head (supervised tokens only) and the tower's
    parameters that never run must be told apart.
    """
    model = module.model
    llm = model.llm
    unused = {id(p) for p in getattr(model.vision, "unused_parameters", list)()}
    embedding = {id(p) for p in llm.get_input_embeddings().parameters()}
    head_module = llm.get_output_embeddings()
    head_params = list(head_module.parameters()) if head_module is not None else []
    head_ids = {id(p) for p in head_params}
    config = llm.config.get_text_config()
    freeze = module.freeze_config
    return flops_model(
        {
            "vision": _count(p for p in model.vision.parameters() if id(p) not in unused),
            "projector": _count(model.projector.parameters()),
            "llm": _count(p for p in llm.parameters() if id(p) not in embedding | head_ids),
            "head": _count(head_params),
        },
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        llm_mode=freeze.llm,
        trained_layers=freeze.llm_blocks,
        tower_tokens=model.vision.num_tokens,
        image_tokens=model.image_tokens,
    )


def flops_per_token(
    module: LightningModule, seq_len: float, views_per_token: float = 0.0, supervised_fraction: float = 1.0
) -> float:
    """Training FLOPs per token of an `LlavaLitModule` on examples of `seq_len` tokens (see `flops_model`)."""
    return flops_model_of(module).per_token_at(seq_len, views_per_token, supervised_fraction)


def mfu(flops: float, seconds: float, peak_flops: float, devices: int = 1) -> float:
    """Model FLOPs utilisation: the FLOPs the model needed over what the devices could do in the time."""
    return flops / (seconds * peak_flops * devices)


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
    """What one batch holds: real tokens (padding excluded), examples, image views and the
    sums the FLOPs model needs."""

    tokens: int
    samples: int
    images: int
    squared_lengths: int
    supervised: int

    @classmethod
    def of(cls, batch: Mapping) -> BatchCounts:
        """A padded batch's lengths are its `attention_mask` rows; a packed one (no mask) lists
        its examples' lengths per row in `seq_lens`; without either every position is real."""
        input_ids = batch.get("input_ids")
        if input_ids is None:  # a reader's skip-only batch
            return cls(0, 0, 0, 0, 0)
        pixels, labels = batch.get("pixel_values"), batch.get("labels")
        mask, seq_lens = batch.get("attention_mask"), batch.get("seq_lens")
        images = 0 if pixels is None else int(pixels.shape[0])
        sums = [] if labels is None else [(labels[:, 1:] != IGNORE_INDEX).sum()]
        if mask is not None:
            lengths = mask.long().sum(dim=1)
            sums += [lengths.sum(), (lengths * lengths).sum()]
        values = [int(v) for v in torch.stack(sums).tolist()] if sums else []  # one device sync for all
        supervised = values[0] if labels is not None else 0
        if mask is not None:
            return cls(values[-2], int(input_ids.shape[0]), images, values[-1], supervised)
        if seq_lens is not None:
            flat = [int(n) for row in seq_lens for n in row]
        else:
            flat = [int(input_ids.shape[1])] * int(input_ids.shape[0])
        return cls(sum(flat), len(flat), images, sum(n * n for n in flat), supervised)

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


# ---- the callbacks ------------------------------------------------------------------------


class TrainingTelemetry(Callback):
    """Per optimizer step: throughput, data wait, memory, gradient norm, learning rates, MFU.

    Logged every `log_every_n_steps` optimizer steps, at the step Lightning logs `train/loss`
    of the same step (so the curves line up):

    - `perf/tokens_per_s`, `perf/samples_per_s`, `perf/images_per_s`: real tokens (padding
      excluded; image placeholders included, the LLM runs them), examples (a packed row holds
      several) and image views, over all ranks, per second of the window;
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
        self.flops = (
            flops_model_of(pl_module) if all(hasattr(model, p) for p in ("vision", "projector", "llm")) else None
        )
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
        self._step_counts.append(BatchCounts.of(batch))

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
        local = [sum(float(getattr(s.counts, f)) for s in steps) for f in ("tokens", "samples", "images")]
        local.append(sum(s.flops for s in steps))
        totals = torch.tensor(local, dtype=torch.float64, device=pl_module.device)
        if trainer.world_size > 1:  # the whole job's counts; every rank is here at the same step
            totals = trainer.strategy.reduce(totals, reduce_op="sum")
        tokens, samples, images, flops = totals.tolist()
        metrics = {
            "perf/step_time_s": seconds / len(steps),
            "perf/tokens_per_step": tokens / len(steps),
            "perf/tokens_per_s": tokens / seconds,
            "perf/samples_per_s": samples / seconds,
            "perf/images_per_s": images / seconds,
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


def readable_prompt(ids: list[int], tokenizer, image_token_id: int) -> str:
    """A prompt's text with each run of image placeholders shown as one `<image>`."""
    pieces: list[str] = []
    run: list[int] = []
    for token in [*ids, None]:
        if token is not None and token != image_token_id:
            run.append(token)
            continue
        if run:
            pieces.append(tokenizer.decode(run, skip_special_tokens=True).strip())
            run = []
        if token is not None and (not pieces or pieces[-1] != IMAGE_TAG):
            pieces.append(IMAGE_TAG)
    return " ".join(piece for piece in pieces if piece)


def unnormalise(view: torch.Tensor, mean: Iterable[float], std: Iterable[float]) -> torch.Tensor:
    """A normalised (3, H, W) view back to [0, 1] pixels."""
    mean_t = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)
    return (view.detach().float().cpu() * std_t + mean_t).clamp(0.0, 1.0)


def sample_text(prompt: str, generated: str, reference: str) -> str:
    """Markdown for TensorBoard's text tab; the prompt indented, so its line breaks stay."""
    quoted = "\n".join("    " + line for line in prompt.splitlines() or [""])
    return f"**prompt**\n\n{quoted}\n\n**generated:** {generated}\n\n**reference:** {reference}"


class SampleGenerations(Callback):
    """Every `every_n_validations` validation runs, the model's greedy answers to the first
    `num_samples` rows of the first validation batch, logged to TensorBoard beside the
    reference: `<tag>/<i>/image` (the row's first image, its first view, un-normalised) and
    `<tag>/<i>/text` (prompt, generated answer, reference answer).

    A row's prompt is its tokens before its first supervised label (rows without one are
    passed over). Rank 0's rows are broadcast and every rank generates them: under FSDP each
    decoder call gathers parameters on all ranks, so all must run the same calls; only rank 0
    logs. The sanity check is skipped: an untrained model's answers tell nothing.
    """

    def __init__(
        self,
        every_n_validations: int = 1,
        num_samples: int = 4,
        max_new_tokens: int | None = None,
        tag: str = "samples",
    ) -> None:
        """
        Args:
            every_n_validations: validation runs between logs (with `val_check_interval` in steps,
                each run is at a step).
            num_samples: rows of the first validation batch to answer.
            max_new_tokens: longest answer; default: the module's `max_new_tokens`.
            tag: TensorBoard tag prefix.
        """
        super().__init__()
        if every_n_validations < 1 or num_samples < 1:
            raise ValueError("every_n_validations and num_samples must be at least 1")
        self.every_n_validations = every_n_validations
        self.num_samples = num_samples
        self.max_new_tokens = max_new_tokens
        self.tag = tag
        self.runs = 0
        self._active = False

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._active = False
        if trainer.sanity_checking:
            return
        self.runs += 1
        self._active = self.runs % self.every_n_validations == 0

    def _rows(self, batch: Mapping) -> dict | None:
        """The first rows with a supervised answer, on the CPU: ids, prompt lengths, their views."""
        labels = batch.get("labels")
        if labels is None or "input_ids" not in batch:
            return None
        answered = (labels != IGNORE_INDEX).any(dim=1).nonzero().flatten().tolist()[: self.num_samples]
        if not answered:
            return None
        return {
            "input_ids": batch["input_ids"].cpu(),
            "labels": labels.cpu(),
            "pixel_values": None if batch.get("pixel_values") is None else batch["pixel_values"].cpu(),
            "image_sizes": None if batch.get("image_sizes") is None else batch["image_sizes"].cpu(),
            "rows": answered,
        }

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._active or batch_idx != 0 or dataloader_idx != 0:
            return
        self._active = False
        mine = self._rows(batch) if trainer.is_global_zero else None
        picked = trainer.strategy.broadcast(mine, src=0)
        if picked is None:
            return
        texts, images = self.generate(pl_module, picked)
        if not trainer.is_global_zero:
            return
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not writers:
            rank_zero_warn("SampleGenerations logs to TensorBoard: add a TensorBoardLogger")
            return
        # inside fit, Lightning logs a validation's scalars at the step index of the last optimizer step
        step = trainer.global_step - 1 if trainer.state.fn == "fit" and trainer.global_step else trainer.global_step
        for writer in writers:
            for i, (text, image) in enumerate(zip(texts, images, strict=True)):
                if image is not None:
                    writer.add_image(f"{self.tag}/{i}/image", image, global_step=step)
                writer.add_text(f"{self.tag}/{i}/text", text, global_step=step)

    def generate(self, pl_module: LightningModule, picked: dict) -> tuple[list[str], list[torch.Tensor | None]]:
        """Greedy answers of the picked rows; their texts and first images."""
        model, tokenizer = pl_module.model, pl_module.tokenizer
        ids, labels, pixels, rows = picked["input_ids"], picked["labels"], picked["pixel_values"], picked["rows"]
        sizes = picked.get("image_sizes")
        spans = model.image_spans(ids, sizes)  # per row: its views, its images
        views = [span[0] for span in spans]
        mine = torch.tensor(rows)
        selected = selected_sizes = None
        if pixels is not None and any(views[row].stop > views[row].start for row in rows):
            selected = torch.cat([pixels[views[row]] for row in rows]).to(pl_module.device)
            if sizes is not None:
                selected_sizes = torch.cat([sizes[spans[row][1]] for row in rows]).to(pl_module.device)
        prompt_lengths = (labels[mine] != IGNORE_INDEX).int().argmax(dim=1)
        max_new = self.max_new_tokens or pl_module.hparams.get("max_new_tokens", 32)
        answers = model.generate(
            ids[mine].to(pl_module.device), prompt_lengths.to(pl_module.device), selected, max_new,
            tokenizer.eos_token_id, image_sizes=selected_sizes,
        )  # fmt: skip
        transform = model.vision.image_transform()
        texts, images = [], []
        for k, row in enumerate(rows):
            prompt = readable_prompt(ids[row, : int(prompt_lengths[k])].tolist(), tokenizer, pl_module.image_token_id)
            reference = tokenizer.decode(labels[row][labels[row] != IGNORE_INDEX].tolist(), skip_special_tokens=True)
            generated = tokenizer.decode(answers[k], skip_special_tokens=True)
            texts.append(sample_text(prompt, generated, reference))
            has_view = views[row].stop > views[row].start
            images.append(unnormalise(pixels[views[row].start], transform.mean, transform.std) if has_view else None)
        return texts, images


__all__ = [
    "PEAK_FLOPS",
    "BatchCounts",
    "FlopsModel",
    "SampleGenerations",
    "TrainingTelemetry",
    "chip_of",
    "flops_model",
    "flops_model_of",
    "flops_per_token",
    "gradient_norm",
    "mfu",
    "peak_flops_of",
    "peak_memory_gb",
]
