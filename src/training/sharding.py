"""FSDP2 (`fully_shard`) for LlavaModel, applied in `configure_model` under Lightning's
`ModelParallelStrategy`.

Each repeated block is its own unit (ViT blocks, decoder layers), so only one block's full
parameters exist at a time; the tower's and the projector's leftovers are units of their
own, so every unit holds one dtype (a frozen part may be kept in bf16 while the rest trains
in float32); the root holds the LLM's embeddings, final norm and head.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from src.core.constants import DTYPES, PARTS


@dataclass
class FSDPConfig:
    """How FSDP2 shards and computes (used under ModelParallelStrategy)."""

    param_dtype: str | None = None
    """Dtype parameters are gathered and computed in (`bfloat16` for speed); None: as stored."""
    reduce_dtype: str | None = "float32"
    """Dtype gradients are reduce-scattered in; float32 keeps bf16 training's sums exact enough."""
    reshard_after_forward: bool = True
    """Free gathered parameters after each block's forward (ZeRO-3); false keeps them (ZeRO-2, faster)."""
    activation_checkpointing: bool = False
    """Recompute each trained block in backward (non-reentrant) instead of keeping its activations: the
    tower's blocks of any tower type (its `VisionTower.wrap_modules()`) and the LLM's decoder layers (`checkpoint_blocks`)."""
    compile_blocks: bool = False
    """torch.compile each decoder layer in place (checkpoint keys unchanged), before sharding, as
    torchtitan does. The first steps pay the compilation (and each new shape family a recompile);
    `benchmarks/train_step.py --variants ours,compile` measures whether it pays on your hardware
    (on the project's CPU it did not)."""


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy with FSDP2's defaults: every process is one
    data-parallel rank (its own `auto` would make a node's GPUs one tensor-parallel group),
    on any number of devices and nodes, with no size to keep in step with the cluster."""

    def __init__(self, tensor_parallel_size: int = 1, save_distributed_checkpoint: bool = True, **kwargs) -> None:
        super().__init__(
            data_parallel_size="auto", tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint, **kwargs,
        )  # fmt: skip

    def setup_environment(self) -> None:
        if self.world_size % self._tensor_parallel_size:
            raise ValueError(f"{self.world_size} processes do not split into tensor-parallel groups of "
                             f"{self._tensor_parallel_size}")  # fmt: skip
        self._data_parallel_size = self.world_size // self._tensor_parallel_size
        super().setup_environment()

    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        """Lightning enters this for every micro-batch but the last of an accumulation window
        (its own ModelParallelStrategy does nothing here, so FSDP2 would reduce-scatter every
        micro-batch): FSDP2 keeps the unsharded gradients and reduces their sum once, at the
        window's last backward. The result is the same; the communication is 1 / accumulate."""
        from torch.distributed.fsdp import FSDPModule

        sharded = [m for m in self.lightning_module.modules() if isinstance(m, FSDPModule)]
        for module in sharded:
            module.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for module in sharded:
                module.set_requires_gradient_sync(True, recurse=False)


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {list(DTYPES)}")
    return DTYPES[name]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model.llm.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model.llm.get_decoder()).__name__} has no `layers` list to shard per layer")
    return layers


def compile_blocks(model: nn.Module) -> int:
    """torch.compile every decoder layer in place (`Module.compile`: keys, hooks and wrappers stay
    as they are); dynamic shapes, since sequence lengths change every step. Returns how many."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def wrap_in_place(root: nn.Module, targets: list[nn.Module], wrap) -> None:
    """Replaces each of `targets` (submodules of `root`) by `wrap(target)` where its parent holds it,
    whatever the container (ModuleList, Sequential, attribute), so the parent's forward runs the wrapper."""
    wanted = {id(module) for module in targets}
    found = [
        (parent, name, child)
        for parent in root.modules()
        for name, child in parent.named_children()
        if id(child) in wanted
    ]
    if len(found) != len(wanted):
        raise ValueError(f"{len(wanted) - len(found)} of {len(wanted)} blocks are not submodules of the model")
    for parent, name, child in found:
        setattr(parent, name, wrap(child))


def checkpoint_trained(root: nn.Module, blocks: list[nn.Module]) -> int:
    """Wraps each of `blocks` (submodules of `root`) that trains for activation checkpointing
    (non-reentrant), in place; returns how many. A block trains when any of its parameters does."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    def wrap(block: nn.Module) -> nn.Module:
        return checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)

    trained = [block for block in blocks if any(p.requires_grad for p in block.parameters())]
    wrap_in_place(root, trained, wrap)
    return len(trained)


def checkpoint_blocks(model: nn.Module, llm: bool = True) -> dict[str, int]:
    """Wraps every trained block for activation checkpointing (non-reentrant); returns how many per part.
    `llm=False` leaves the decoder layers alone: with `model.llm.gradient_checkpointing` transformers
    already recomputes them, and a second wrapper would run each trained layer's forward three times.

    The blocks are the tower's own (`VisionTower.wrap_modules()`: a timm ViT's blocks or CNN's
    stages, a transformers tower's encoder layers, each tower's of a fused one) and the LLM's
    decoder layers; a block trains when any of its parameters does (a LoRA adapter counts). Frozen
    blocks are left alone: a frozen tower runs without autograd, and the recomputation of frozen
    decoder layers that gradients pass through is `model.llm.gradient_checkpointing`'s job.
    """
    parts = [("vision", model.vision.wrap_modules()), ("llm", list(decoder_layers(model)) if llm else [])]
    return {part: checkpoint_trained(model, blocks) for part, blocks in parts}


def tower_units(tower: nn.Module) -> list[tuple[str, nn.Module]]:
    """The tower's FSDP2 units, in the order they are sharded: each block, then the tower (its
    leftovers: embeddings, norms, a fused tower's glue)."""
    return [*((f"vision.block{i}", block) for i, block in enumerate(tower.wrap_modules())), ("vision", tower)]


def shard_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every FSDP2 unit of the model, inner before outer, as `fully_shard` must be applied: the
    tower's, the anyres newline (run outside the projector), the projector, each decoder layer,
    then the root (the LLM's embeddings, final norm and head)."""
    units = tower_units(model.vision)
    newline = getattr(model.projector, "anyres", None)
    if newline is not None:
        units.append(("projector.anyres", newline))
    units.append(("projector", model.projector))
    units += [(f"llm.layer{i}", layer) for i, layer in enumerate(decoder_layers(model))]
    units.append(("root", model))
    return units


def shard_model(model: nn.Module, mesh, config: FSDPConfig) -> list[str]:
    """Applies fully_shard per block, per part, then to the root; returns the units, in order."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(param_dtype=_dtype(config.param_dtype), reduce_dtype=_dtype(config.reduce_dtype))
    options = {"mesh": mesh, "mp_policy": policy, "reshard_after_forward": config.reshard_after_forward}
    units = shard_units(model)
    for _, module in units:
        fully_shard(module, **options)
    # evaluation and generation call these instead of forward: the root's own parameters (embeddings,
    # final norm, head) must be gathered around them too; every rank runs the tower (encode_always)
    for method in ("score_candidates", "generate", "reply"):
        register_fsdp_forward_method(model, method)
    model.encode_always = True
    return [name for name, _ in units]


def cast_frozen(model: nn.Module, dtype: str | None) -> list[str]:
    """Stores the parts that do not train at all in `dtype` (bf16 halves their memory)."""
    target = _dtype(dtype)
    if target is None:
        return []
    cast = []
    for part in PARTS:
        module = getattr(model, part)
        if not any(p.requires_grad for p in module.parameters()):
            module.to(target)
            cast.append(part)
    return cast
