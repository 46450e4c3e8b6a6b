"""The tower contract: what every family (`timm`, `hf`, `fused`, ...) tells the rest of the kit,
so that training, sharding, checkpoints and the data pipeline ask the tower, never its type.

A family is one class registered in `VISION_TOWERS` that implements the abstract members
below; `tests/model/test_contracts.py` builds every registered family from a tiny config and
checks the whole contract, so a family that forgets a member fails a test, not a run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import fields

import torch
from torch import nn

from src.model.image_transform import HALF, IMAGE_MODES, ImageTransform
from src.model.vision.config import DEFAULTS, FEATURE_SELECTS, VisionConfig, as_vision_config
from src.registry import Registry

COMMON_FIELDS = frozenset({"type", "feature_select", "image_size", "image_mode", "anyres_grids", "anyres_merge"})
"""The VisionConfig fields every family reads (the base class reads them)."""


class VisionTower(nn.Module, ABC):
    """Image pixels -> a grid of features, and everything the kit asks of a tower.

    A family sets, in its `__init__` (after `super().__init__(config)`, ending with
    `self._finish()`): `input_size` and `patch_size`, and `default_mean` / `default_std` when
    not 0.5; and implements the abstract members:
    - `hidden_size`, `grid`, `num_prefix_tokens`: the shape of `forward`'s output,
      (images, num_prefix_tokens + h * w, hidden_size), prefix (CLS, register) tokens first;
    - `wrap_modules()`: its repeated blocks, the units FSDP2 shards one by one and activation
      checkpointing wraps (`src.training.sharding`), and those `freeze: partial` trains;
    - `weights_from_hub(config)`: whether a config's weights are rebuilt exactly from the hub or
      a file, so checkpoints may leave them out (`src.training.stage.kept_in_checkpoint`);
    - `forward`;
    and declares `type_name` (its registered name) and `config_fields` (the VisionConfig fields
    it reads; one set for another family is refused). A family that reads one layer sets
    `layer`, the 0-based block it reads (`feature_layer` resolved); one made of other towers
    (fused) leaves it None. `image_transform()` and `unused_parameters()` have defaults.
    """

    type_name: str = ""
    config_fields: frozenset[str] = COMMON_FIELDS
    input_size: int
    """Side of the square pixels `forward` takes."""
    patch_size: int
    """Pixels per token along a side (the patch size, or a CNN stage's stride)."""
    default_mean: tuple[float, float, float] = HALF
    default_std: tuple[float, float, float] = HALF
    layer: int | None = None
    """The 0-based block (or stage) whose output `forward` returns; None for a tower of towers."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        if config.type != self.type_name:
            raise ValueError(f"{type(self).__name__} builds type {self.type_name!r}, not {config.type!r}")
        self.check_fields(config)
        if config.feature_select not in FEATURE_SELECTS:
            raise ValueError(f"unknown feature_select {config.feature_select!r}; choose one of {list(FEATURE_SELECTS)}")
        if config.image_mode not in IMAGE_MODES:
            raise ValueError(f"unknown image_mode {config.image_mode!r}; choose one of {list(IMAGE_MODES)}")
        self.image_mode = config.image_mode
        self.anyres_grids = tuple(tuple(grid) for grid in config.anyres_grids or ())
        self.anyres_merge = config.anyres_merge
        self.mean_override = config.mean
        self.std_override = config.std
        self.feature_select = config.feature_select
        self.keep_prefix = config.feature_select == "cls_patch"

    @classmethod
    def check_fields(cls, config: VisionConfig, where: str = "vision") -> None:
        """A field set for another tower type is a recipe mistake: say so instead of ignoring it."""
        stray = [
            f.name
            for f in fields(VisionConfig)
            if f.name not in cls.config_fields and getattr(config, f.name) != getattr(DEFAULTS, f.name)
        ]
        if stray:
            hint = "; set them on its towers" if config.type == "fused" else ""
            raise ValueError(f"{where}: type {config.type!r} does not use {stray}{hint}")

    # ---- what a family must provide ----------------------------------------------------
    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Channels of each output token."""

    @property
    @abstractmethod
    def grid(self) -> tuple[int, int]:
        """(h, w) of the patch tokens `forward` returns per image (per view under anyres)."""

    @property
    @abstractmethod
    def num_prefix_tokens(self) -> int:
        """CLS / register tokens kept before the patch grid in the output (0 for `patch`)."""

    @abstractmethod
    def wrap_modules(self) -> list[nn.Module]:
        """The repeated blocks, in forward order, each a submodule of the tower, none inside
        another: the units FSDP2 shards one by one, and the blocks activation checkpointing wraps
        where they train (`src.training.sharding`), whatever the tower."""

    @classmethod
    @abstractmethod
    def weights_from_hub(cls, config: VisionConfig) -> bool:
        """True when building `config` again gives the same weights (hub or file weights), so a
        checkpoint needs only the tower's trained parameters; False when they start random."""

    @abstractmethod
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, 3, input_size, input_size) -> (images, num_tokens, hidden_size)."""

    # ---- shared ------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        h, w = self.grid
        return h * w + self.num_prefix_tokens

    def image_transform(self) -> ImageTransform:
        """What loader workers run on each image: a picklable value, handed to the data pipeline."""
        return ImageTransform(
            size=self.input_size,
            mean=tuple(self.mean_override or self.default_mean),
            std=tuple(self.std_override or self.default_std),
            mode=self.image_mode,
            grids=self.anyres_grids,
        )

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters kept only so the weights match their library's class; they never run."""
        return []

    def requires_grad_(self, requires_grad: bool = True) -> VisionTower:
        """As nn.Module's, but modules that never run stay frozen: a parameter without a
        gradient in a trained tower stops DDP (unless it looks for unused parameters)."""
        super().requires_grad_(requires_grad)
        for param in self.unused_parameters():
            param.requires_grad_(False)
        return self

    def _finish(self) -> None:
        """Checks the transform settings at construction, not in the first loader worker."""
        self.image_transform()
        self.requires_grad_(True)


VISION_TOWERS: Registry[type[VisionTower]] = Registry("vision tower type")


def build_vision_tower(config: VisionConfig) -> VisionTower:
    return VISION_TOWERS.get(config.type)(config)


def weights_from_hub(config: VisionConfig | dict) -> bool:
    """Whether the tower `config` describes is rebuilt from the hub (see `VisionTower.weights_from_hub`)."""
    config = as_vision_config(config)
    return VISION_TOWERS.get(config.type).weights_from_hub(config)


def resolve_layer(feature_layer: int, depth: int, unit: str) -> int:
    """`feature_layer` (negative counts from the last) as a 0-based index into `depth` blocks."""
    layer = feature_layer if feature_layer >= 0 else depth + feature_layer
    if not 0 <= layer < depth:
        raise ValueError(
            f"feature_layer {feature_layer} is outside a {depth}-{unit} tower; choose {-depth}..{depth - 1} "
            f"(negative counts from the last {unit})"
        )
    return layer


def check_size(size: int, patch: int, what: str, exact: bool) -> None:
    if size < patch:
        raise ValueError(f"image_size {size} is smaller than one {patch}-pixel {what}; use at least {patch}")
    if exact and size % patch:
        raise ValueError(
            f"image_size {size} is not a multiple of the {patch}-pixel {what}; use e.g. {size // patch * patch} "
            f"or {(size // patch + 1) * patch}"
        )
