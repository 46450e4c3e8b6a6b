"""A training stage as data: what trains in each part, at what learning rate, and what a
checkpoint of the stage must hold.

LLaVA stage 1 trains the projector alone; stage 2 the projector and the LLM; the LoRA
variant an adapter on a frozen LLM. Recipes say which per part, instead of code paths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from src.core.constants import PARTS

PART_MODES = {
    "vision": ("frozen", "full", "partial"),
    "projector": ("frozen", "full"),
    "llm": ("frozen", "full", "lora", "partial"),
}


@dataclass
class FreezeConfig:
    """What trains, per part. LLaVA stage 1 trains only the projector."""

    vision: str = "frozen"
    """`frozen`, `full` (trained), or `partial` (the last `vision_blocks` blocks train)."""
    projector: str = "full"
    """`frozen` or `full` (trained)."""
    llm: str = "frozen"
    """`frozen`, `full`, `lora` (an adapter, `llm.lora`, on a frozen base) or `partial` (the last `llm_blocks`
    decoder layers train)."""
    vision_blocks: int = 0
    """Blocks of the tower that train under `vision: partial`, counted from the last one kept."""
    llm_blocks: int = 0
    """Decoder layers that train under `llm: partial`, counted from the last."""


@dataclass
class OptimizerConfig:
    lr: float = 2e-5
    """Peak learning rate (AdamW) of every part without its own in `part_lr`."""
    weight_decay: float = 0.0
    """Applied to matrices only, never to biases, norms or embeddings' 1-D parameters."""
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.03
    """Fraction of all steps spent warming up linearly from 0 (rounded up, as the HF Trainer does)."""
    warmup_steps: int | None = None
    """Warm-up steps; overrides warmup_ratio when set."""
    min_lr_ratio: float = 0.0
    """The cosine decays to lr * min_lr_ratio at the last step."""
    part_lr: dict[str, float] = field(default_factory=dict)
    """Peak learning rate per part, e.g. `{projector: 2e-5}` with `lr: 2e-4` (LLaVA's LoRA recipe)."""
    part_weight_decay: dict[str, float] = field(default_factory=dict)
    """Weight decay per part, overriding `weight_decay`."""
    fused: bool | None = None
    """Fused AdamW kernel; None: on when every trained parameter is on a GPU."""


def check_stage(freeze: FreezeConfig, optimizer: OptimizerConfig) -> None:
    for part in PARTS:
        mode = getattr(freeze, part)
        if mode not in PART_MODES[part]:
            raise ValueError(f"freeze.{part}: unknown mode {mode!r}; choose one of {list(PART_MODES[part])}")
    for part, blocks in (("vision", freeze.vision_blocks), ("llm", freeze.llm_blocks)):
        if getattr(freeze, part) == "partial" and blocks < 1:
            raise ValueError(f"freeze.{part}: partial needs freeze.{part}_blocks >= 1 (how many last blocks train)")
    for name, table in (("part_lr", optimizer.part_lr), ("part_weight_decay", optimizer.part_weight_decay)):
        unknown = sorted(set(table) - set(PARTS))
        if unknown:
            raise ValueError(f"optimizer.{name}: unknown parts {unknown}; choose from {list(PARTS)}")


def blocks_of(model: nn.Module, part: str) -> list[nn.Module]:
    """A part's repeated blocks in order: the tower's wrap units, the LLM's decoder layers."""
    if part == "vision":
        return list(model.vision.wrap_modules())
    decoder = model.llm.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(decoder).__name__} has no `layers`: partial training cannot find its blocks")
    return list(layers)


def apply_freeze(model: nn.Module, freeze: FreezeConfig) -> None:
    """Sets requires_grad per part; under `lora` peft has already frozen all but the adapter."""
    for part in PARTS:
        mode = getattr(freeze, part)
        if mode == "lora":
            continue
        getattr(model, part).requires_grad_(mode == "full")
        if mode == "partial":
            blocks = blocks_of(model, part)
            count = getattr(freeze, f"{part}_blocks")
            if count > len(blocks):
                raise ValueError(f"freeze.{part}_blocks {count} is more than the {len(blocks)} blocks the {part} has")
            for block in blocks[-count:]:
                block.requires_grad_(True)
    if hasattr(model.vision, "unused_parameters"):  # kept for weight compatibility, never run
        for param in model.vision.unused_parameters():
            param.requires_grad_(False)


def parameter_groups(model: nn.Module, optimizer: OptimizerConfig) -> list[dict]:
    """Per part, matrices with weight decay and the rest (biases, norms) without; named, so
    the learning-rate monitor logs each group."""
    groups = []
    for part in PARTS:
        lr = optimizer.part_lr.get(part, optimizer.lr)
        decay = optimizer.part_weight_decay.get(part, optimizer.weight_decay)
        params = [p for p in getattr(model, part).parameters() if p.requires_grad]
        matrices = [p for p in params if p.ndim >= 2]
        others = [p for p in params if p.ndim < 2]
        if matrices:
            groups.append({"name": part, "params": matrices, "lr": lr, "weight_decay": decay})
        if others:
            groups.append({"name": f"{part}/no_decay", "params": others, "lr": lr, "weight_decay": 0.0})
    if not groups:
        raise ValueError("nothing trains: every part is frozen")
    return groups


def warmup_steps_for(optimizer: OptimizerConfig, total: int) -> int:
    """`warmup_steps`, else ceil(`warmup_ratio` x total steps): the HF Trainer's count
    (`TrainingArguments.get_warmup_steps`), so a LLaVA recipe warms up as long as LLaVA does
    (stage 1: ceil(0.03 x 2,180) = 66, LLaVA's ceil(0.03 x 2,181) = 66)."""
    if optimizer.warmup_steps is not None:
        return optimizer.warmup_steps
    return math.ceil(total * optimizer.warmup_ratio)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at `step` (0-based): the same numbers as transformers'
    `get_cosine_schedule_with_warmup` (the HF Trainer's `cosine`, which LLaVA trains with), so the
    first step runs at 0 and step `warmup` at the peak; then a half cosine down to `min_ratio` at
    `total` (transformers' `get_cosine_with_min_lr_schedule_with_warmup`), held there after it."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    progress = min(1.0, float(step - warmup) / float(max(1, total - warmup)))
    factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, factor * (1 - min_ratio) + min_ratio)


def lr_schedule(optimizer: Optimizer, config: OptimizerConfig, total: int) -> LambdaLR:
    """Linear warm-up then cosine over `total` optimizer steps, stepped once per step."""
    warmup = warmup_steps_for(config, total)
    return LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total, config.min_lr_ratio))


def kept_in_checkpoint(model: nn.Module, rebuildable: set[str]) -> set[str]:
    """State keys a checkpoint must hold: everything, except in parts the config rebuilds
    exactly (hub weights, `init_from`), where only trained parameters are kept. So a stage-1
    checkpoint holds the projector (megabytes), and a LoRA one the adapter, not the 7B base."""
    # activation checkpointing wraps blocks: parameter names gain a prefix state-dict keys do not have
    trained = {
        name.replace("_checkpoint_wrapped_module.", "") for name, p in model.named_parameters() if p.requires_grad
    }
    return {key for key in model.state_dict() if key.split(".", 1)[0] not in rebuildable or key in trained}
