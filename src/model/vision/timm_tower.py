"""The `timm` family: any timm ViT-style model (ViT, SigLIP, EVA, DeiT ...) cut at a block, or a
timm CNN with feature stages (ConvNeXt) read at a stage's feature map."""

from __future__ import annotations

import timm
import torch
from torch import nn

from src.model.image_transform import HALF
from src.model.vision.base import COMMON_FIELDS, VISION_TOWERS, VisionTower, check_size, resolve_layer
from src.model.vision.config import VisionConfig

DEFAULT_TIMM_MODEL = "vit_base_patch16_224"


def check_timm_activation(name: str, kwargs: dict) -> None:
    """Refuses pretrained weights trained with QuickGELU in a timm architecture that runs GELU.

    timm registers OpenAI's CLIP weights (and MetaCLIP's, DFN's, some LAION ones) under GELU
    architectures too, `vit_large_patch14_clip_336.openai` beside
    `vit_large_patch14_clip_quickgelu_336.openai`, and notes on the former's pretrained config
    that the weights are "natively QuickGELU". Loaded into GELU blocks they run, but every block's
    activations differ from the model that was trained, so the features are not the published
    tower's. An error, not a warning: a warning is lost in the log of a days-long run, and the fix
    is one word. An explicit `kwargs.act_layer` is the user's choice and is respected.
    """
    from timm.layers import QuickGELU
    from timm.models import get_pretrained_cfg

    if "act_layer" in kwargs:
        return
    cfg = get_pretrained_cfg(name)
    if cfg is None or not any("QuickGELU" in note for note in cfg.notes or ()):
        return
    arch = name.split(".")[0]
    with torch.device("meta"):  # the architecture as `kwargs` build it, without memory or weights
        model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    if any(isinstance(module, QuickGELU) for module in model.modules()):
        return
    variant = arch.replace("_clip_", "_clip_quickgelu_")
    instead = f"name: {variant}.{cfg.tag} (the same weights in QuickGELU blocks), or " if timm.is_model(variant) else ""
    raise ValueError(
        f"timm model {name!r}: its pretrained weights were trained with QuickGELU (timm's note on "
        f"{arch}.{cfg.tag}), but {arch} runs GELU, so its features would not be the trained model's; use "
        f"{instead}kwargs: {{act_layer: quick_gelu}} (or another act_layer, to choose the activation yourself)"
    )


@VISION_TOWERS.register("timm")
class TimmVisionTower(VisionTower):
    """A timm model cut at a block (ViT-style: ViT, SigLIP, EVA, DeiT ...) or at a feature
    stage (CNNs with `forward_intermediates`, e.g. ConvNeXt: the stage's map is the grid)."""

    type_name = "timm"
    config_fields = COMMON_FIELDS | {"name", "pretrained", "feature_layer", "mean", "std", "kwargs"}

    @classmethod
    def weights_from_hub(cls, config: VisionConfig) -> bool:
        """timm starts random unless `pretrained` (its hub weights, or `kwargs.pretrained_cfg_overlay`'s file)."""
        return bool(config.pretrained)

    def __init__(self, config: VisionConfig) -> None:
        super().__init__(config)
        name = config.name or DEFAULT_TIMM_MODEL
        if not timm.is_model(name.split(".")[0]):
            raise ValueError(f"unknown timm model {name!r}; see timm.list_models()")
        kwargs = dict(config.kwargs)
        if config.pretrained:  # before any download
            check_timm_activation(name, kwargs)
        create = dict(pretrained=bool(config.pretrained), num_classes=0)
        try:
            sized = kwargs | ({"img_size": config.image_size} if config.image_size is not None else {})
            self.model = timm.create_model(name, **create, **sized)
        except TypeError as error:  # CNNs take any input size and have no img_size
            if "img_size" not in str(error):
                raise
            self.model = timm.create_model(name, **create, **kwargs)
        model = self.model
        self.is_vit = all(
            hasattr(model, a) for a in ("blocks", "patch_embed", "num_prefix_tokens", "forward_intermediates")
        )
        if self.is_vit:
            depth, unit = len(model.blocks), "block"
        elif hasattr(model, "forward_intermediates") and getattr(model, "feature_info", None):
            depth, unit = len(model.feature_info), "stage"
        else:
            raise ValueError(
                f"timm model {name!r} is neither a ViT-style model with blocks nor a CNN with feature stages"
            )
        self.full_depth = depth
        self.layer = resolve_layer(config.feature_layer, depth, unit)
        prefix = model.num_prefix_tokens if self.is_vit else 0
        if self.keep_prefix and prefix == 0:
            raise ValueError(
                f"feature_select cls_patch keeps prefix tokens but timm model {name!r} has none; use patch"
            )
        cfg = model.pretrained_cfg
        self.default_mean = tuple(cfg.get("mean", HALF))
        self.default_std = tuple(cfg.get("std", HALF))
        if self.is_vit:
            self.patch_size = int(model.patch_embed.patch_size[0])
            self.input_size = int(model.patch_embed.img_size[0])
            check_size(self.input_size, self.patch_size, "patch", exact=False)
        else:
            self.patch_size = int(model.feature_info[self.layer]["reduction"])
            self.input_size = int(config.image_size or cfg.get("input_size", (3, 224, 224))[-1])
            check_size(self.input_size, self.patch_size, f"stride of stage {self.layer}", exact=True)
        # blocks/stages after the feature layer, the final norm and the head never run: drop them
        model.prune_intermediate_layers([self.layer], prune_norm=True, prune_head=True)
        self._finish()

    @property
    def hidden_size(self) -> int:
        return self.model.embed_dim if self.is_vit else int(self.model.feature_info[self.layer]["num_chs"])

    @property
    def grid(self) -> tuple[int, int]:
        if self.is_vit:
            return tuple(self.model.patch_embed.grid_size)
        side = self.input_size // self.patch_size
        return (side, side)

    @property
    def num_prefix_tokens(self) -> int:
        return self.model.num_prefix_tokens if self.keep_prefix else 0

    def wrap_modules(self) -> list[nn.Module]:
        if self.is_vit:
            return list(self.model.blocks)
        if hasattr(self.model, "stages"):
            return list(self.model.stages)
        return [self.model.get_submodule(info["module"]) for info in self.model.feature_info[: self.layer + 1]]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, 3, H, W) -> (images, tokens, hidden)."""
        if not self.is_vit:
            (feature_map,) = self.model.forward_intermediates(
                pixel_values, indices=[self.layer], intermediates_only=True
            )
            return feature_map.flatten(2).transpose(1, 2)
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
