"""Vision towers: image -> a grid of patch features from a chosen layer.

LLaVA reads the penultimate layer (-2) of CLIP and drops the CLS token: the last layer is
trained for the contrastive objective and generalises worse as token features.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn

FEATURE_SELECTS = ("patch", "cls_patch")


@dataclass
class ImageTransform:
    """Resize to the tower's square input and normalise; picklable for loader workers."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (pixels - mean) / std


@dataclass
class VisionConfig:
    """A timm vision transformer by name."""

    name: str = "vit_base_patch16_224"
    """timm model name (`timm.list_models()`); with `pretrained`, weights come from the hub."""
    pretrained: bool = False
    """Load the pretrained weights timm knows for `name`."""
    feature_layer: int = -2
    """Block whose output is used; negative counts from the last (LLaVA: -2)."""
    feature_select: str = "patch"
    """`patch` drops CLS/prefix tokens (LLaVA); `cls_patch` keeps them first."""
    image_size: int | None = None
    """Input resolution; None keeps the model's default."""
    kwargs: dict = field(default_factory=dict)
    """Extra `timm.create_model` arguments (patch_size, embed_dim, depth, num_heads ...)."""


class TimmVisionTower(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        if config.feature_select not in FEATURE_SELECTS:
            raise ValueError(f"unknown feature_select {config.feature_select!r}; choose one of {list(FEATURE_SELECTS)}")
        kwargs = dict(config.kwargs)
        if config.image_size is not None:
            kwargs["img_size"] = config.image_size
        if not timm.is_model(config.name.split(".")[0]):
            raise ValueError(f"unknown timm model {config.name!r}; see timm.list_models()")
        self.model = timm.create_model(config.name, pretrained=config.pretrained, num_classes=0, **kwargs)
        if not hasattr(self.model, "forward_intermediates") or not hasattr(self.model, "blocks"):
            raise ValueError(f"timm model {config.name!r} is not a ViT-style model with blocks")
        depth = len(self.model.blocks)
        layer = config.feature_layer if config.feature_layer >= 0 else depth + config.feature_layer
        if not 0 <= layer < depth:
            raise ValueError(f"feature_layer {config.feature_layer} is outside a {depth}-block tower")
        self.layer = layer
        self.keep_prefix = config.feature_select == "cls_patch"
        # blocks after the feature layer, the final norm and the head never run: drop them
        self.model.prune_intermediate_layers([layer], prune_norm=True, prune_head=True)

    @property
    def hidden_size(self) -> int:
        return self.model.embed_dim

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.grid_size)

    @property
    def num_prefix_tokens(self) -> int:
        """CLS / register tokens kept before the patch grid in the output."""
        return self.model.num_prefix_tokens if self.keep_prefix else 0

    @property
    def num_tokens(self) -> int:
        h, w = self.grid
        return h * w + self.num_prefix_tokens

    def image_transform(self) -> ImageTransform:
        cfg = self.model.pretrained_cfg
        size = self.model.patch_embed.img_size
        return ImageTransform(
            size=int(size[0]), mean=tuple(cfg.get("mean", (0.5,) * 3)), std=tuple(cfg.get("std", (0.5,) * 3))
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, 3, H, W) -> (images, tokens, hidden)."""
        out = self.model.forward_intermediates(
            pixel_values,
            indices=[self.layer],
            intermediates_only=True,
            output_fmt="NLC",
            norm=False,
            return_prefix_tokens=self.keep_prefix,
        )[0]
        if self.keep_prefix:
            patches, prefix = out
            return torch.cat([prefix, patches], dim=1)
        return out


def build_vision_tower(config: VisionConfig) -> TimmVisionTower:
    return TimmVisionTower(config)
