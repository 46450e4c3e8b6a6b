"""Training-step throughput: this kit's LLaVA step against transformers' Llava, same weights, same samples.

Both sides start from identical weights (ours is built by `LlavaLitModule.configure_model`,
the baseline is `src.export.to_transformers` of it, deep-copied) and train LLaVA stage 2
(tower frozen; projector and LLM trained; AdamW, same learning rate and schedule) on the
same steps of samples, in the same process, one step each in turn after warm-up.

- baseline: what LLaVA's official training does with transformers'
  `LlavaForConditionalGeneration`: right-padded batches with an attention mask, the model's
  own loss (logits over the whole vocabulary at every position, upcast to float32, mean
  cross-entropy over the supervised ones), `torch.optim.AdamW` as the HF Trainer makes it
  (`adamw_torch`, weight decay 0). Steps are LLaVA's `group_by_modality_length` batches on
  one device: random samples of one modality per step.
- ours: the kit's code path (`LlavaLitModule.forward` -> `LlavaModel`, its
  `configure_optimizers`) with its best settings: the step's samples packed into rows
  (`batching.pack` + `collate_packed`, per-example attention, rows of `max_length` as
  `data.batching: pack` makes them; SDPA attends example by example, `sdpa_by_example`),
  logits and cross-entropy
  only at supervised positions, a chunk at a time (`src.model.loss`), the frozen tower run
  without autograd (stored in bf16 in bf16 runs), fused AdamW, FlashAttention when
  installed (else SDPA); torch.compile of the decoder layers is a variant (`--variants
  ours,compile`), off by default: on the CPU a recompile ate its ~5% gain.

Every step's loss must be equal on both sides: 1e-4 relative in float32, bf16 tolerance in
bf16; otherwise the run stops with `LossMismatch` (a speed trick must not change the math).
Reported per side: tokens/s (real tokens, padding excluded), samples/s, peak memory and, on
a GPU, MFU over useful FLOPs (`src.training.callbacks.flops_model_of`: logits counted only
at supervised positions, no padding), and ours / baseline as the median of per-step ratios.
`--ablation` adds variants of ours that each leave one trick out, timed in the same rotation.
On a CPU, peak memory comes from child processes that train one side each (`probe_memory`).

    python benchmarks/train_step.py --preset cpu-small --threads 1 --ablation --out train_step_cpu.json
    python benchmarks/train_step.py --preset gpu --out train_step_gpu.json

The batch stream (`make_samples`) is described in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from src.data.batching import collate_packed, pack  # noqa: E402
from src.data.conversation import IGNORE_INDEX  # noqa: E402
from src.data.samples import Example  # noqa: E402

# ---- sizes ------------------------------------------------------------------------------


@dataclass
class Preset:
    image_size: int
    patch_size: int
    tower_hidden: int
    tower_layers: int  # kept layers: LLaVA reads layer -2, so the config has one more
    tower_heads: int
    tower_intermediate: int
    llm_hidden: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    llm_intermediate: int
    vocab: int
    samples_per_step: int
    max_length: int
    warmup: int
    steps: int
    dtype: str  # float32 or bfloat16 (autocast with float32 master weights, as bf16-mixed)
    text_scale: float = 1.0  # text lengths x this (the tiny test size shortens them)
    lr: float = 2e-5


PRESETS = {
    # for the tests: seconds on one core; 16 image tokens, not LLaVA's 576
    "tiny": Preset(32, 8, 32, 2, 2, 64, 48, 2, 4, 2, 96, 512, 6, 256, 1, 3, "float32", text_scale=0.15, lr=1e-3),
    # this 2-core CPU in a few minutes: 576 image tokens (24x24), a 32k vocabulary, a small decoder
    "cpu-small": Preset(336, 14, 64, 2, 4, 256, 384, 4, 6, 2, 1024, 32000, 4, 2048, 2, 8, "float32"),
    # one H100: CLIP ViT-L/14-336 (23 of 24 layers run) + a 1.1B Llama (TinyLlama's shape), bf16
    "gpu": Preset(336, 14, 1024, 23, 16, 4096, 2048, 22, 32, 4, 5632, 32000, 8, 2048, 3, 20, "bfloat16"),
}

BF16_RTOL = 2e-2  # per-step loss agreement when either side computes in bf16
FP32_RTOL = 1e-4


class LossMismatch(AssertionError):
    """Ours and the baseline computed different losses on the same samples: a trick changed the math."""


# ---- the batch stream ---------------------------------------------------------------------


def _lognormal(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return int(min(high, max(low, round(rng.lognormvariate(math.log(median), sigma)))))


def conversation(rng: random.Random, with_image: bool, scale: float) -> list[tuple[int, bool]]:
    """(tokens, supervised) segments of one llava_v1_5_mix665k-like conversation, image excluded.

    A vicuna_v1 system prompt (34 tokens), then 1-6 rounds of "USER: question ASSISTANT:"
    (unsupervised) and an answer + `</s>` (supervised). Image samples: 55% VQA-style rounds
    with short answers (VQAv2, GQA, OCR-VQA, RefCOCO: median 3 tokens), the rest LLaVA-Instruct
    replies (log-normal, median 60 tokens, up to 450). Text-only (ShareGPT): 1-4 rounds,
    questions median 40 tokens, replies median 160, up to 650. Roughly 1.3 tokens per word of
    `benchmarks/data_loader.py`'s workload, which follows the same mix.
    """

    def n(median: float, sigma: float, low: int, high: int) -> int:
        return max(1, round(_lognormal(rng, median, sigma, low, high) * scale))

    segments = [(n(34, 0.0, 34, 34), False)]
    if with_image:
        short = rng.random() < 0.55
        rounds = rng.choice([1, 1, 2, 3, 4, 5, 6]) if not short else rng.randint(1, 6)
        for _ in range(rounds):
            segments.append((n(12, 0.6, 3, 80) + 4, False))
            segments.append((n(3, 0.5, 1, 20) if short else n(60, 0.9, 5, 450), True))
    else:
        for _ in range(rng.randint(1, 4)):
            segments.append((n(40, 1.0, 3, 400) + 4, False))
            segments.append((n(160, 0.9, 5, 650), True))
    return segments


def make_samples(
    count: int,
    image_tokens: int,
    image_size: int,
    image_token_id: int,
    max_length: int,
    seed: int,
    text_scale: float = 1.0,
) -> list[Example]:
    """`count` samples, ~10% text-only, as the data pipeline hands them over (image placeholders expanded)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        with_image = rng.random() >= 0.10
        segments = conversation(rng, with_image, text_scale)
        ids, sup = [1], [False]  # <s>
        for k, (length, supervised) in enumerate(segments):
            if k == 1 and with_image:
                ids += [image_token_id] * image_tokens
                sup += [False] * image_tokens
            ids += [rng.randrange(3, image_token_id) for _ in range(length)]
            sup += [supervised] * length
        ids, sup = ids[:max_length], sup[:max_length]
        input_ids = torch.tensor(ids, dtype=torch.long)
        if int((input_ids == image_token_id).sum()) not in (0, image_tokens):
            ids, sup = ids[: ids.index(image_token_id)], sup[: ids.index(image_token_id)]  # cut inside the image
            input_ids = torch.tensor(ids, dtype=torch.long)
        labels = torch.where(torch.tensor(sup), input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        has_image = bool((input_ids == image_token_id).any())
        pixels = torch.randn(1, 3, image_size, image_size, generator=g) if has_image else None
        samples.append(Example(input_ids, labels, pixels))
    return samples


def modality_batches(samples: list[Example], batch_size: int, rng: random.Random) -> list[list[Example]]:
    """LLaVA's `group_by_modality_length` on one device: random batches of one modality, in random order."""
    image = [s for s in samples if s.pixel_values is not None]
    text = [s for s in samples if s.pixel_values is None]
    rng.shuffle(image)
    rng.shuffle(text)
    batches = [group[i : i + batch_size] for group in (image, text) for i in range(0, len(group), batch_size)]
    batches = [b for b in batches if len(b) == batch_size]
    rng.shuffle(batches)
    return batches


def collate_padded(samples: list[Example], pad_id: int) -> dict:
    """LLaVA's `DataCollatorForSupervisedDataset`: right-padded ids, labels -100 and mask 0 on the padding."""
    width = max(int(s.input_ids.shape[0]) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = int(s.input_ids.shape[0])
        input_ids[i, :n], labels[i, :n], mask[i, :n] = s.input_ids, s.labels, 1
    pixels = [s.pixel_values for s in samples if s.pixel_values is not None]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": mask,
        "pixel_values": torch.cat(pixels) if pixels else None,
    }


def collate_ours(samples: list[Example], pad_id: int, max_length: int, batching: str) -> dict:
    """`pad`: as the baseline; `pack`: rows of `max_length`; `pack-fit`: rows as long as the step's longest sample.

    Rows as long as the longest sample are the shortest packing can make: with attention that
    computes whole rows under a mask (SDPA, eager), a row costs its length squared whatever it holds.
    """
    if batching == "pad":
        return collate_padded(samples, pad_id)
    if batching == "pack-fit":
        max_length = max(int(s.input_ids.shape[0]) for s in samples)
    (rows,) = pack(samples, max_length, rows_per_batch=len(samples), rng=random.Random(0))
    batch = collate_packed(rows, pad_id)
    return pad_packed_to(batch, max_length, pad_id) if batching == "pack-full" else batch


def pad_packed_to(batch: dict, width: int, pad_id: int) -> dict:
    """A packed batch with every row `width` long: the added tail is one more segment (positions restart
    at 0, labels -100), so the examples' math is unchanged. One shape for every step: a compiled kernel
    (FlexAttention, compiled per shape by transformers) is compiled once."""
    extra = width - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    rows = batch["input_ids"].shape[0]
    return batch | {
        "input_ids": F.pad(batch["input_ids"], (0, extra), value=pad_id),
        "labels": F.pad(batch["labels"], (0, extra), value=IGNORE_INDEX),
        "position_ids": torch.cat([batch["position_ids"], torch.arange(extra).expand(rows, extra)], 1),
    }


# ---- models -------------------------------------------------------------------------------


def make_tokenizer(vocab: int, folder: Path) -> Path:
    """A word-level tokenizer of `vocab` tokens (`<image>` the last, added by the kit): only its size matters."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab - 1)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return folder


def build_module(preset: Preset, tokenizer_dir: Path, seed: int):
    """The kit's module for LLaVA stage 2, built as `fit` builds it (in float32; ours is tuned later)."""
    from src.model.projector import ProjectorConfig
    from src.model.vision import VisionConfig
    from src.training.module import LlavaLitModule
    from src.training.stage import FreezeConfig, OptimizerConfig

    p = preset
    clip = {
        "model_type": "clip_vision_model",
        "image_size": p.image_size,
        "patch_size": p.patch_size,
        "hidden_size": p.tower_hidden,
        "num_hidden_layers": p.tower_layers + 1,
        "num_attention_heads": p.tower_heads,
        "intermediate_size": p.tower_intermediate,
    }
    llama = {
        "model_type": "llama",
        "hidden_size": p.llm_hidden,
        "intermediate_size": p.llm_intermediate,
        "num_hidden_layers": p.llm_layers,
        "num_attention_heads": p.llm_heads,
        "num_key_value_heads": p.llm_kv_heads,
        "max_position_embeddings": 4096,
    }
    torch.manual_seed(seed)
    module = LlavaLitModule(
        str(tokenizer_dir),
        vision=VisionConfig(type="hf", config=clip, feature_layer=-2, feature_select="patch"),
        projector=ProjectorConfig("mlp", {"depth": 2}),
        llm={"config": llama, "attn_implementation": "auto"},
        freeze=FreezeConfig(vision="frozen", projector="full", llm="full"),
        optimizer=OptimizerConfig(lr=p.lr, warmup_steps=0),
    )
    module.configure_model()
    if len(module.tokenizer) != p.vocab or module.model.llm.get_output_embeddings().weight.shape[0] != p.vocab:
        raise RuntimeError(f"expected a {p.vocab}-token vocabulary, built {len(module.tokenizer)}")
    return module.train()


@dataclass
class Variant:
    """Ours with each trick on or off (`variants()` lists them)."""

    name: str = "ours"
    batching: str = "pack"  # pack (rows of max_length), pack-fit (rows of the step's longest sample), pad
    logits: str = "chunked"  # chunked (the kit), supervised (unchunked, all kept), full (every position)
    fused_adamw: bool = True
    tower_bf16: bool = False
    compile_blocks: bool = False
    changes_math: bool = field(default=False)  # bf16 tower in a float32 run: compared at bf16 tolerance
    attention: str | None = None  # an attn_implementation other than the base module's (flex_attention)
    kind: str = "ours"  # ours (the kit's model), or hf-liger (transformers' Llava, packed, Liger's fused loss)

    def describe(self) -> str:
        if self.kind == "hf-liger":
            return f"transformers LlavaForConditionalGeneration, {self.batching}, Liger fused linear CE, AdamW"
        return (
            f"{self.batching}{f', {self.attention}' if self.attention else ''}, logits {self.logits}, "
            f"{'fused' if self.fused_adamw else 'for-loop/foreach'} AdamW, tower "
            f"{'bf16' if self.tower_bf16 else 'as model'}{', compiled blocks' if self.compile_blocks else ''}"
        )


def _full_vocab_loss(model, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The baseline's loss inside our model: logits at every position (the `full` ablation)."""
    from src.model.language import lm_logits

    logits = lm_logits(model.llm, hidden[:, :-1]).float()
    count = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX), count


def _unchunked_loss(model, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The loss before chunking: logits at supervised positions only, all at once (the `supervised` ablation)."""
    from src.model.language import lm_logits

    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return F.cross_entropy(lm_logits(model.llm, hidden[:, :-1][keep]).float(), targets[keep]), int(keep.sum())


def make_ours(base_module, variant: Variant, total_steps: int):
    """A copy of the module with `variant`'s settings, and its optimizer and schedule from `configure_optimizers`."""
    from src.training.sharding import cast_frozen

    module = copy.deepcopy(base_module)
    model = module.model
    if variant.tower_bf16:
        cast_frozen(model, "bfloat16")
    if variant.logits == "full":
        model.supervised_loss = _full_vocab_loss.__get__(model)
    elif variant.logits == "supervised":
        model.supervised_loss = _unchunked_loss.__get__(model)
    if variant.compile_blocks:
        for layer in model.llm.get_decoder().layers:
            layer.compile(dynamic=True)
    if variant.attention:
        model.llm.set_attn_implementation(variant.attention)
    module.optimizer_config = replace(module.optimizer_config, fused=variant.fused_adamw)
    module.trainer = SimpleNamespace(estimated_stepping_batches=total_steps)  # all configure_optimizers reads
    config = module.configure_optimizers()
    module.trainer = None
    return module, config["optimizer"], config["lr_scheduler"]["scheduler"]


def make_baseline(base_module, total_steps: int):
    """transformers' Llava with the module's weights (copied), trained as LLaVA stage 2 with the HF Trainer."""
    from src.export import to_transformers
    from src.training.stage import lr_schedule

    hf = copy.deepcopy(to_transformers(base_module.model, base_module.image_token_id, len(base_module.tokenizer)))
    # LLaVA trains with flash_attention_2 when it is installed (train_mem.py): the same backend as ours
    from src.model.language import SDPA_BY_EXAMPLE

    attention = base_module.model.llm.config._attn_implementation
    attention = "sdpa" if attention == SDPA_BY_EXAMPLE else attention  # transformers' own SDPA
    hf.set_attn_implementation({"text_config": attention, "vision_config": "sdpa", "": attention})
    hf.train()
    hf.model.vision_tower.requires_grad_(False)
    cfg = base_module.optimizer_config
    params = [p for p in hf.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=0.0)
    schedule = lr_schedule(optimizer, cfg, total_steps)  # the kit's: transformers' cosine with warm-up
    return hf, optimizer, schedule


def liger_unavailable() -> str | None:
    """Why the Liger configuration cannot run here, or None."""
    if not torch.cuda.is_available():
        return "Liger's kernels are Triton kernels: they need a CUDA GPU"
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # noqa: F401
    except ImportError as error:
        return f"liger_kernel does not import ({error}); carry its wheel (pip download liger-kernel)"
    return None


def liger_side(base_module, total_steps: int, batches: list[dict], device, dtype: str) -> Side:
    """The strongest setup a LLaMA-Factory / lmms-engine user would pick on transformers' Llava:
    padding-free packing (`position_ids` restarting per example, no mask: transformers' own
    per-example masks) and Liger's fused linear cross-entropy (logits never materialised whole),
    with the baseline's AdamW, on the same weights and samples."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    hf, optimizer, schedule = make_baseline(base_module, total_steps)
    fused_loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)
    projector = list(hf.model.multi_modal_projector.parameters())

    def step(batch: dict) -> torch.Tensor:
        with _autocast(device, dtype):
            hidden = hf.model(
                input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=None,
                position_ids=batch["position_ids"], use_cache=False,
            ).last_hidden_state  # fmt: skip
            flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            loss = fused_loss(hf.lm_head.weight.to(flat.dtype), flat, batch["labels"][:, 1:].reshape(-1))
        return _hf_update(loss, projector, optimizer, schedule)

    return Side("transformers + packing + Liger", step, list(hf.parameters()), optimizer, batches, device, dtype)


# ---- timing and memory ----------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory a step adds over what was held when it began.

    GPU: `torch.cuda.max_memory_allocated`. CPU: the resident set size sampled every
    2 ms by a thread (tracemalloc does not see torch's allocations and
    `ru_maxrss` is one high-water mark for the whole process, both sides together).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self.sampler_cpu = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak_abs = _rss_bytes()
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_abs = max(self.peak_abs, _rss_bytes())
            time.sleep(0.002)
        self.sampler_cpu = time.thread_time()  # this thread's CPU time, taken out of the step's

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak_abs, _rss_bytes()) - self.start


def state_bytes(params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> int:
    """Memory a side holds between steps: its parameters and its optimizer's state."""
    total = sum(p.numel() * p.element_size() for p in params)
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _autocast(device: torch.device, dtype: str):
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


class Side:
    """One trained model (ours or the baseline): a step function plus what it measured."""

    def __init__(self, name: str, step, params, optimizer, batches: list[dict], device, dtype: str) -> None:
        self.name, self._step, self.params, self.optimizer = name, step, params, optimizer
        self.batches, self.device, self.dtype = batches, device, dtype
        self.losses: list[float] = []
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []  # CPU time of the process's threads: steadier on a shared CPU
        self.step_peak: list[int] = []

    def run(self, index: int, timed: bool) -> None:
        batch = _to(self.batches[index], self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        with PeakMemory(self.device) as memory:
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = self._step(batch)
            value = float(loss)  # waits for the device
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        self.losses.append(value)
        if timed:
            self.seconds.append(elapsed)
            self.cpu_seconds.append(cpu - memory.sampler_cpu)
            self.step_peak.append(memory.peak)


def ours_side(name: str, module, optimizer, schedule, batches, device, dtype) -> Side:
    def step(batch: dict) -> torch.Tensor:
        with _autocast(device, dtype):  # the forward only, as Lightning's bf16-mixed
            loss = module(batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    params = list(module.model.parameters())
    return Side(name, step, params, optimizer, batches, device, dtype)


def baseline_side(hf, optimizer, schedule, batches, device, dtype) -> Side:
    projector = list(hf.model.multi_modal_projector.parameters())

    def step(batch: dict) -> torch.Tensor:
        with _autocast(device, dtype):  # the forward only, as the HF Trainer's bf16
            loss = hf(**batch, use_cache=False).loss
        return _hf_update(loss, projector, optimizer, schedule)

    return Side("baseline", step, list(hf.parameters()), optimizer, batches, device, dtype)


def _hf_update(loss: torch.Tensor, projector: list, optimizer, schedule) -> torch.Tensor:
    """Backward and one optimizer step for a transformers-Llava side. A text-only batch leaves the
    projector without gradients; LLaVA's dummy image gives it zeros, so AdamW steps it alike."""
    loss.backward()
    for p in projector:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def check_losses(reference: Side, other: Side, rtol: float) -> float:
    """Largest relative difference of the two sides' losses so far; `LossMismatch` when over `rtol`."""
    worst = 0.0
    for step, (a, b) in enumerate(zip(reference.losses, other.losses, strict=True)):
        diff = abs(a - b) / max(abs(a), 1e-12)
        if not math.isfinite(b) or diff > rtol:
            raise LossMismatch(
                f"step {step}: {other.name} loss {b:.8f} vs {reference.name} {a:.8f} "
                f"(relative difference {diff:.2e} > {rtol:.0e}): a speed trick changed the math"
            )
        worst = max(worst, diff)
    return worst


# ---- the run ---------------------------------------------------------------------------------


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if "Model name" in ln), "?")
        info["load_average"] = list(os.getloadavg())
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def variants(dtype: str) -> dict[str, Variant]:
    """Ours at its best for `dtype` and the attention backend, then ours with one trick left out (or one more
    tried) each, by key.

    Packed rows of `max_length`, as `data.batching: pack` makes them: FlashAttention (varlen) and
    the kit's SDPA (`sdpa_by_example`) attend within each example only, so a row's length costs
    nothing in attention. (Under transformers' SDPA, which computes the whole row under the dense
    mask, rows as long as the step's longest sample were better: `pack-max-dense`, `pack-fit`.)
    In bf16 the frozen tower is stored in bf16 (`frozen_dtype: bfloat16`), as everything
    computes in bf16 anyway; in a float32 run a bf16 tower changes the math, so it is only an
    ablation row, compared at bf16 tolerance.
    """
    bf16 = dtype == "bfloat16"
    best = Variant(batching="pack", tower_bf16=bf16)
    table = {
        "ours": best,
        "padded": replace(best, name="ours, padded (no packing)", batching="pad"),
        "pack-max": replace(best, name="ours, rows of max_length", batching="pack"),
        "pack-fit": replace(best, name="ours, rows of the longest sample", batching="pack-fit"),
        # transformers' own SDPA on packed rows: the whole row under the dense block-diagonal mask
        "pack-max-dense": replace(
            best, name="ours, rows of max_length, dense mask", batching="pack", attention="sdpa"
        ),  # fmt: skip
        "unchunked": replace(best, name="ours, logits unchunked", logits="supervised"),
        "full-logits": replace(best, name="ours, logits at every position", logits="full"),
        "unfused": replace(best, name="ours, unfused AdamW", fused_adamw=False),
        "compile": replace(best, name="ours + compiled decoder layers", compile_blocks=True),
        # FlexAttention skips the blocks across examples; rows of max_length, one shape: compiled once
        "flex": replace(best, name="ours + FlexAttention", batching="pack-full", attention="flex_attention"),
        "liger": Variant(name="transformers + packing + Liger", batching=best.batching, kind="hf-liger"),
    }
    if bf16:
        table["tower-fp32"] = replace(best, name="ours, float32 frozen tower", tower_bf16=False)
    else:
        table["tower-bf16"] = replace(best, name="ours + bf16 frozen tower", tower_bf16=True, changes_math=True)
    return table


ABLATION = ("ours", "padded", "pack-max", "pack-fit", "unchunked", "full-logits", "unfused", "tower-bf16", "tower-fp32")


def prepare(args: argparse.Namespace) -> SimpleNamespace:
    """The preset with its flags applied, the base module, the steps' samples and the chosen variants."""
    preset = replace(
        PRESETS[args.preset], **{k: v for k, v in vars(args).items() if k in PRESET_FLAGS and v is not None}
    )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = preset.image_size // preset.patch_size
    total = preset.warmup + preset.steps
    with tempfile.TemporaryDirectory() as tmp:
        base = build_module(preset, make_tokenizer(preset.vocab, Path(tmp) / "tok"), args.seed)
    image_tokens = base.model.image_tokens
    if args.preset != "tiny" and image_tokens != 576:
        raise ValueError(f"{image_tokens} image tokens per image: a {grid}x{grid} grid, LLaVA-1.5 has 24x24 = 576")
    rng = random.Random(args.seed)
    samples = make_samples(
        total * preset.samples_per_step * 3, image_tokens, preset.image_size, base.image_token_id,
        preset.max_length, args.seed, preset.text_scale,
    )  # fmt: skip
    steps = modality_batches(samples, preset.samples_per_step, rng)[:total]
    if len(steps) < total:
        raise RuntimeError(f"only {len(steps)} steps of samples for {total}")
    table = variants(preset.dtype)
    if args.variants:
        keys = args.variants.split(",")
    else:
        same_as_ours = {k for k, v in table.items() if k != "ours" and replace(v, name="ours") == table["ours"]}
        keys = [k for k in ABLATION if k in table and k not in same_as_ours] if args.ablation else ["ours"]
    unknown = sorted(set(keys) - set(table))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {sorted(table)}")
    if "flex" in keys and device.type != "cuda":
        raise ValueError("variant flex needs a CUDA GPU: FlexAttention has no backward on a CPU")
    if "liger" in keys and liger_unavailable():
        raise ValueError(f"variant liger cannot run here: {liger_unavailable()}")
    return SimpleNamespace(
        preset=preset, device=device, total=total, base=base, image_tokens=image_tokens, steps=steps,
        pad_id=base.tokenizer.pad_token_id, keys=keys, table=table,
    )  # fmt: skip


def probe_memory(args: argparse.Namespace) -> dict:
    """Peak resident memory of a process that trains only `args.probe` (baseline or a variant key), on a CPU.

    Run as a child process with glibc's mmap threshold lowered, so that freed tensors leave the
    resident set and the sampled RSS follows what is really held: in the timing process every
    side shares one heap, and a side reuses pages another side freed.
    """
    import gc

    env = prepare(args)
    preset, steps, pad_id = env.preset, env.steps, env.pad_id
    before_build = _rss_bytes()
    if args.probe == "baseline":
        model, opt, sched = make_baseline(env.base, env.total)
        side = baseline_side(model, opt, sched, [collate_padded(s, pad_id) for s in steps], env.device, preset.dtype)
    else:
        variant = env.table[args.probe]
        module, opt, sched = make_ours(env.base, variant, env.total)
        batches = [collate_ours(s, pad_id, preset.max_length, variant.batching) for s in steps]
        side = ours_side(variant.name, module, opt, sched, batches, env.device, preset.dtype)
    del env.base
    gc.collect()
    peaks = []
    for index in range(min(env.total, args.probe_steps)):
        with PeakMemory(env.device) as memory:
            side.run(index, timed=False)
        peaks.append(memory.peak_abs)
    return {"peak_mb": (max(peaks) - before_build) / 2**20, "losses": side.losses}


def probe_in_child(args: argparse.Namespace, key: str) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), *args.argv, "--probe", key]
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("PROBE ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"memory probe of {key} failed:\n{done.stderr[-2000:]}")
    return json.loads(line[len("PROBE ") :])


def run(args: argparse.Namespace) -> dict:
    env = prepare(args)
    preset, device, total, base, steps, pad_id = env.preset, env.device, env.total, env.base, env.steps, env.pad_id
    image_tokens = env.image_tokens
    chosen = [env.table[k] for k in env.keys]
    base.to(device)
    baseline_model, b_opt, b_sched = make_baseline(base, total)
    sides = [baseline_side(baseline_model, b_opt, b_sched, [collate_padded(s, pad_id) for s in steps], device,
                           preset.dtype)]  # fmt: skip
    counts = []
    from src.training.callbacks import BatchCounts, flops_model_of, peak_flops_of

    attention = base.model.llm.config._attn_implementation
    for variant in chosen:
        batches = [collate_ours(s, pad_id, preset.max_length, variant.batching) for s in steps]
        if not counts:
            packed = [collate_ours(s, pad_id, preset.max_length, "pack") for s in steps]
            counts = [BatchCounts.of(b) for b in packed]
        if variant.kind == "hf-liger":
            sides.append(liger_side(base, total, batches, device, preset.dtype))
            continue
        module, opt, sched = make_ours(base, variant, total)
        sides.append(ours_side(variant.name, module, opt, sched, batches, device, preset.dtype))
    flops = flops_model_of(base)
    del base
    env.base = None  # every side has its own copy: the base's memory goes back before timing
    if device.type == "cuda":
        torch.cuda.empty_cache()

    rtol = BF16_RTOL if preset.dtype == "bfloat16" else FP32_RTOL
    order = list(range(len(sides)))
    for index in range(total):
        timed = index >= preset.warmup
        order = order[1:] + order[:1]  # who goes first rotates
        for k in order:
            sides[k].run(index, timed)
        for side, variant in zip(sides[1:], chosen, strict=True):
            check_losses(sides[0], side, BF16_RTOL if variant.changes_math else rtol)
        if args.verbose:
            print(f"step {index}: " + ", ".join(f"{s.name} {s.losses[-1]:.6f}" for s in sides), file=sys.stderr)

    timed_counts = counts[preset.warmup :]
    tokens = sum(c.tokens for c in timed_counts)
    n_samples = sum(c.samples for c in timed_counts)
    useful = [flops.step_flops(c.tokens, c.squared_lengths, c.supervised, c.images) for c in timed_counts]
    peak = args.peak_flops
    if peak is None and device.type == "cuda":
        peak = peak_flops_of(torch.cuda.get_device_name(), "bf16" if preset.dtype == "bfloat16" else "tf32")
    baseline = sides[0]
    results = {"sides": {}}
    probes = {}
    if device.type == "cpu" and args.memory_probe != "none":
        for key in ["baseline", *(env.keys if args.memory_probe == "all" else env.keys[:1])]:
            probes[key] = probe_in_child(args, key)
    for side, variant, key in zip(sides, [None, *chosen], ["baseline", *env.keys], strict=True):
        seconds = sum(side.seconds)
        entry = {
            "settings": "transformers LlavaForConditionalGeneration, padded, full-vocab loss, AdamW"
            if variant is None
            else variant.describe(),
            "tokens_per_s": tokens / seconds,
            "samples_per_s": n_samples / seconds,
            "seconds_per_step_median": statistics.median(side.seconds),
            "state_mb": state_bytes(side.params, side.optimizer) / 2**20,
            "step_peak_mb": max(side.step_peak) / 2**20,
            "losses": side.losses,
            "step_seconds": side.seconds,
            "step_cpu_seconds": side.cpu_seconds,
            "tokens_per_cpu_s": tokens / sum(side.cpu_seconds),
        }
        entry["peak_mb"] = entry["state_mb"] + entry["step_peak_mb"]
        entry["peak_mb_from"] = "parameters + optimizer state + the most a step added (in this process)"
        if key in probes:
            entry["peak_mb"] = probes[key]["peak_mb"]
            entry["peak_mb_from"] = "peak RSS of a child process training this side alone, above its start"
            if any(abs(a - b) > 1e-5 * abs(a) for a, b in zip(probes[key]["losses"], side.losses, strict=False)):
                raise LossMismatch(f"{side.name}: the memory probe's losses differ from this run's")
        entry["tflops_per_s"] = sum(useful) / seconds / 1e12
        if peak:
            entry["mfu"] = sum(useful) / seconds / peak
        if variant is not None:
            per_step = [b / o for b, o in zip(baseline.seconds, side.seconds, strict=True)]
            entry["tokens_per_s_ratio_median"] = statistics.median(per_step)
            entry["tokens_per_s_ratio_overall"] = sum(baseline.seconds) / seconds
            entry["per_step_ratios"] = per_step
            if device.type == "cpu":
                cpu_ratios = [b / o for b, o in zip(baseline.cpu_seconds, side.cpu_seconds, strict=True)]
                entry["cpu_time_ratio_median"] = statistics.median(cpu_ratios)
                entry["cpu_time_ratio_overall"] = sum(baseline.cpu_seconds) / sum(side.cpu_seconds)
            entry["peak_memory_ratio"] = entry["peak_mb"] / results["sides"]["baseline"]["peak_mb"]
            entry["max_loss_rel_diff"] = check_losses(baseline, side, 1.0)
        results["sides"][side.name] = entry
    results |= {
        "preset": args.preset,
        "config": vars(preset),
        "device": str(device),
        "machine": machine(),
        "image_tokens": image_tokens,
        "attention": attention,
        "timed_steps": preset.steps,
        "real_tokens": tokens,
        "samples": n_samples,
        "supervised_fraction": sum(c.supervised for c in timed_counts) / tokens,
        "padded_fraction": _padded_fraction(sides[0].batches[preset.warmup :], tokens),
        "loss_rtol": rtol,
        "useful_tflops_per_step": statistics.mean(useful) / 1e12,
        "peak_flops": peak,
    }
    return results


def _padded_fraction(batches: list[dict], real_tokens: int) -> float:
    area = sum(int(b["input_ids"].numel()) for b in batches)
    return 1 - real_tokens / area


PRESET_FLAGS = (
    "samples_per_step", "steps", "warmup", "llm_layers", "llm_hidden", "llm_intermediate", "tower_layers", "dtype"
)  # fmt: skip


def report(results: dict) -> str:
    m = results["machine"]
    on_cpu = results["device"] == "cpu"
    lines = [
        f"preset {results['preset']} on {results['device']} ({m.get('gpu') or m.get('cpu')}), "
        f"load average {m.get('load_average', ['?'])[0]:.2f}, attention {results['attention']}, "
        f"{results['timed_steps']} timed steps, {results['real_tokens']} real tokens, {results['samples']} samples, "
        f"{results['supervised_fraction']:.1%} supervised, baseline batches {results['padded_fraction']:.1%} padding",
        f"{'side':<32} {'tok/s':>8} {'samp/s':>7} {'peak MB':>8} {'MFU':>6} "
        f"{'x tok/s':>8} {'x CPU':>6} {'x mem':>6} {'loss diff':>9}",
    ]
    for name, s in results["sides"].items():
        mfu = f"{s['mfu']:.1%}" if "mfu" in s else "-"
        ratio = f"{s['tokens_per_s_ratio_median']:.2f}x" if "tokens_per_s_ratio_median" in s else "1"
        cpu = f"{s['cpu_time_ratio_median']:.2f}x" if "cpu_time_ratio_median" in s else ("1" if on_cpu else "-")
        mem = f"{s['peak_memory_ratio']:.2f}" if "peak_memory_ratio" in s else "1"
        diff = f"{s['max_loss_rel_diff']:.1e}" if "max_loss_rel_diff" in s else "-"
        lines.append(
            f"{name:<32} {s['tokens_per_s']:>8.1f} {s['samples_per_s']:>7.2f} {s['peak_mb']:>8.0f} "
            f"{mfu:>6} {ratio:>8} {cpu:>6} {mem:>6} {diff:>9}"
        )
    lines.append(
        "x tok/s: median over steps of the baseline's step time / this side's (wall); x CPU: the same with "
        "CPU time (steadier on a shared CPU); x mem: peak MB / the baseline's; peak MB: "
        + next(iter(results["sides"].values()))["peak_mb_from"]
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--steps", type=int, help="timed steps (preset's by default)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (losses still checked)")
    parser.add_argument("--samples-per-step", type=int, help="samples in each step's batch")
    parser.add_argument("--llm-layers", type=int)
    parser.add_argument("--llm-hidden", type=int)
    parser.add_argument("--llm-intermediate", type=int)
    parser.add_argument("--tower-layers", type=int, help="tower layers that run (LLaVA: 23 of CLIP-L's 24)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (bf16: autocast)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--ablation", action="store_true", help="also time ours with each trick left out")
    parser.add_argument(
        "--variants", help="comma-separated variants of ours to time (ours, padded, pack-max, pack-fit, unchunked, "
        "full-logits, unfused, compile, tower-bf16 in float32 / tower-fp32 in bf16; flex: FlexAttention, CUDA "
        "only), or liger (transformers' Llava packed + Liger's fused linear CE, CUDA + liger_kernel); default: "
        "ours, or the ablation set"
    )  # fmt: skip
    parser.add_argument("--peak-flops", type=float, help="peak FLOP/s of the device, for MFU (GPU: from the table)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--verbose", action="store_true", help="print every step's losses")
    parser.add_argument(
        "--memory-probe", choices=["none", "main", "all"], default="main",
        help="CPU peak memory from child processes that train one side each: baseline and ours (main), every "
        "variant (all), or none (estimates from this process)",
    )  # fmt: skip
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: the child process of --memory-probe
    parser.add_argument("--probe-steps", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = [a for a in (sys.argv[1:] if argv is None else argv)]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.probe:
        results = probe_memory(args)
        print("PROBE " + json.dumps(results))
        return results
    results = run(args)
    print(report(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
