"""Vision towers: image -> a grid of patch features from a chosen layer, and their image transforms.

LLaVA reads the penultimate layer (-2) of CLIP and drops the CLS token: the last layer is
trained for the contrastive objective and generalises worse as token features. Every tower
keeps only the layers up to the one it reads, so later layers never run.

Tower types (`VisionConfig.type`), one registry:
- `timm`: any timm ViT-style model (ViT, SigLIP, EVA, DeiT ...) cut at a block, or a timm
  CNN with feature stages (ConvNeXt) read at a stage's feature map;
- `hf`: a transformers vision model (CLIP, SigLIP, SigLIP2, DINOv2 with or without
  registers) by hub id / folder or inline config, kept as transformers' own class so its
  weights can be exported to a transformers Llava folder;
- `fused`: the patch features of several towers concatenated channel-wise (Prismatic's
  DINOv2 + SigLIP).

What the rest of the kit uses of a tower: `hidden_size`, `grid` (h, w), `num_prefix_tokens`,
`num_tokens`, `image_transform()`, `wrap_modules()` and `forward(pixels (N, 3, H, W)) ->
(N, num_prefix_tokens + h * w, hidden_size)`, prefix (CLS, register) tokens first.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from src.model.language import _coerce
from src.registry import Registry

FEATURE_SELECTS = ("patch", "cls_patch")
IMAGE_MODES = ("resize", "resize_crop", "pad", "anyres")
ANYRES_MERGES = ("unpad", "flat")
"""How anyres views become tokens (`src.model.anyres`): LLaVA-NeXT's `spatial_unpad` or its `flat`."""
DEFAULT_TIMM_MODEL = "vit_base_patch16_224"

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


# ---- image transform ----------------------------------------------------------------------
def default_anyres_grids(size: int) -> tuple[tuple[int, int], ...]:
    """LLaVA-NeXT's resolutions for a crop size s: 2x1, 1x2, 2x2, 3x1, 1x3 crops, as (w, h) pixels."""
    return ((2 * size, size), (size, 2 * size), (2 * size, 2 * size), (3 * size, size), (size, 3 * size))


def select_best_resolution(image_size: tuple[int, int], grids: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """LLaVA-NeXT's choice of canvas (w, h) for an image (w, h): the most image pixels kept
    after a fitting downscale (never counting upscaling as gain), ties to the least padding."""
    width, height = image_size
    best, best_effective, best_wasted = grids[0], -1, math.inf
    for grid_w, grid_h in grids:
        scale = min(grid_w / width, grid_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = grid_w * grid_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (grid_w, grid_h), effective, wasted
    return best


def resize_and_pad(image: Image.Image, target: tuple[int, int], fill: tuple[int, int, int]) -> Image.Image:
    """Fits the image inside `target` (w, h) keeping its aspect ratio, centred on a `fill` canvas."""
    width, height = image.size
    target_w, target_h = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(height * scale_w), target_h)
    else:
        new_w, new_h = min(math.ceil(width * scale_h), target_w), target_h
    canvas = Image.new("RGB", target, fill)
    canvas.paste(
        image.resize((new_w, new_h), Image.Resampling.BICUBIC), ((target_w - new_w) // 2, (target_h - new_h) // 2)
    )
    return canvas


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's expand2square: the image centred on a square canvas of its longer side."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def shortest_edge_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) with the shorter side at `size`, as CLIP's image processor resizes (transformers'
    `get_resize_output_image_size`): the longer side truncated, `int(size * long / short)`, not
    rounded, so a 640x427 photo becomes 503x336 (rounding gives 504) and every pixel matches."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def _check_grids(grids: tuple[tuple[int, int], ...], size: int) -> None:
    for grid in grids:
        if len(grid) != 2 or any(side <= 0 or side % size for side in grid):
            suggestion = [max(size, round(side / size) * size) for side in grid]
            raise ValueError(
                f"anyres_grids entry {list(grid)} is not a [width, height] of multiples of the crop size {size}; "
                f"use e.g. {suggestion}"
            )


@dataclass
class ImageTransform:
    """PIL image -> (views, 3, size, size) normalised pixels; a picklable dataclass, run in loader workers.

    `mode`: `resize` squashes the image to a square; `resize_crop` scales the shorter side to
    `size` and takes the centre square; `pad` centres it on a square of the `fill` colour
    first (LLaVA-1.5); `anyres` (LLaVA-NeXT) adds to one downscaled global view the
    `size`-square crops of the best of `grids` (w, h). Every mode gives one view but anyres.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mode: str = "resize"
    grids: tuple[tuple[int, int], ...] = ()
    """anyres canvases (width, height) in pixels, multiples of `size`; empty: `default_anyres_grids`."""
    fill: tuple[int, int, int] | None = None
    """`pad` colour; None: the mean colour, int(255 * mean), which normalises to zero."""

    def __post_init__(self) -> None:
        if self.mode not in IMAGE_MODES:
            raise ValueError(f"unknown image_mode {self.mode!r}; choose one of {list(IMAGE_MODES)}")
        self.size = int(self.size)
        self.mean = tuple(float(x) for x in self.mean)
        self.std = tuple(float(x) for x in self.std)
        if self.fill is not None:
            self.fill = tuple(int(x) for x in self.fill)
        grids = tuple(tuple(int(side) for side in grid) for grid in self.grids)
        if self.mode == "anyres":
            grids = grids or default_anyres_grids(self.size)
            _check_grids(grids, self.size)
        self.grids = grids

    @property
    def fill_colour(self) -> tuple[int, int, int]:
        return self.fill if self.fill is not None else tuple(int(255 * m) for m in self.mean)

    def views_for(self, width: int, height: int) -> int:
        """How many views an image of this size becomes: 1, or for anyres 1 + its crops."""
        if self.mode != "anyres":
            return 1
        grid_w, grid_h = select_best_resolution((width, height), self.grids)
        return 1 + (grid_w // self.size) * (grid_h // self.size)

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        """The smallest (width, height) an image stored at this size may be decoded at: the size
        the image itself is resampled to, so a reduced decode (`decode_image(..., draft=...)`)
        never leaves fewer pixels than the views take. None for anyres, whose choice of canvas
        depends on the stored size."""
        size = self.size
        if self.mode == "resize":
            return size, size
        if self.mode == "resize_crop":
            return shortest_edge_size(width, height, size)
        if self.mode != "pad":
            return None
        scale = size / max(width, height)
        return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))

    def _pad_and_resize(self, image: Image.Image) -> Image.Image:
        """`expand_to_square(image, fill).resize((size, size), BICUBIC)`, pixel for pixel, with less work.

        Pillow resamples horizontally first, then vertically, through an 8-bit intermediate,
        and its fixed-point weights turn a constant row into the same constant. So for a wide
        image the intermediate of the padded square is the image's rows resampled on their
        own with fill rows above and below: the fill rows' horizontal pass (a quarter of a 4:3
        photo's canvas) and the full-size canvas are skipped. Every row of a tall image's
        canvas holds image pixels, so it takes the plain path.
        """
        size, fill = self.size, self.fill_colour
        width, height = image.size
        if width <= height:
            return expand_to_square(image, fill).resize((size, size), Image.Resampling.BICUBIC)
        strip = image.resize((size, height), Image.Resampling.BICUBIC)  # the horizontal pass alone
        tall = Image.new("RGB", (size, width), fill)
        tall.paste(strip, (0, (width - height) // 2))
        return tall.resize((size, size), Image.Resampling.BICUBIC)  # the vertical pass alone

    def views(self, image: Image.Image) -> list[Image.Image]:
        """The PIL views before normalisation."""
        if image.mode != "RGB":
            image = image.convert("RGB")  # convert() copies even an RGB image
        size = self.size
        if self.mode == "resize":
            return [image.resize((size, size), Image.Resampling.BICUBIC)]
        if self.mode == "pad":
            return [self._pad_and_resize(image)]
        if self.mode == "resize_crop":
            width, height = shortest_edge_size(*image.size, size)
            image = image.resize((width, height), Image.Resampling.BICUBIC)
            left, top = (width - size) // 2, (height - size) // 2
            return [image.crop((left, top, left + size, top + size))]
        # anyres pads with black, as LLaVA-NeXT and transformers' LlavaNext processor do
        canvas = resize_and_pad(image, select_best_resolution(image.size, self.grids), (0, 0, 0))
        crops = [
            canvas.crop((left, top, left + size, top + size))
            for top in range(0, canvas.height, size)
            for left in range(0, canvas.width, size)
        ]
        return [image.resize((size, size), Image.Resampling.BICUBIC), *crops]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        views = self.views(image)
        width, height = views[0].size
        out = torch.empty(len(views), 3, height, width)
        for index, view in enumerate(views):
            for channel, plane in enumerate(view.split()):  # planar uint8, written straight into place
                out[index, channel].copy_(torch.from_numpy(np.array(plane)))
        # the same float32 operations, in the same order, as (x / 255 - mean) / std: equal bits
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return out.div_(255.0).sub_(mean).div_(std)


# ---- config -------------------------------------------------------------------------------
@dataclass
class VisionConfig:
    """A vision tower: its type, which model, which layer, and how images become pixels."""

    type: str = "timm"
    """`timm` (a timm model by name), `hf` (a transformers vision model) or `fused` (several towers'
    features concatenated channel-wise)."""
    name: str | None = None
    """timm: model name (`timm.list_models()`; unset: vit_base_patch16_224). hf: hub id or local folder."""
    pretrained: bool | None = None
    """Load pretrained weights. Unset: timm no; hf yes when `name` is given (as the LLM does), and false
    builds that architecture randomly initialised."""
    config: dict = field(default_factory=dict)
    """hf only: inline config of a randomly initialised model: `model_type` (clip_vision_model,
    siglip_vision_model, siglip2_vision_model, dinov2, dinov2_with_registers) plus its fields."""
    trust_remote_code: bool = False
    """hf only: passed to transformers when loading `name`; run a hub repo's own code only if you trust it."""
    feature_layer: int = -2
    """Block (timm ViT, hf encoder layer) or stage (timm CNN) whose output is used; negative counts from
    the last (LLaVA: -2, transformers' hidden_states[-2]); k >= 0 is block k, i.e. hidden_states[k + 1]."""
    feature_select: str = "patch"
    """`patch` drops CLS/register tokens (LLaVA); `cls_patch` keeps them first."""
    image_size: int | None = None
    """Square input resolution; unset: the model's own (timm pretrained_cfg, hf preprocessor or config).
    fused: the resolution of the shared [0, 1] pixels, default the largest tower's."""
    image_mode: str = "resize"
    """`resize` (squash to a square), `resize_crop` (shorter side, centre crop), `pad` (LLaVA-1.5: pad to
    a square with the mean colour) or `anyres` (LLaVA-NeXT: a global view plus tiles)."""
    anyres_grids: list[tuple[int, int]] | None = None
    """anyres canvases [width, height] in pixels, multiples of the input size s; unset: [[2s, s],
    [s, 2s], [2s, 2s], [3s, s], [s, 3s]]."""
    anyres_merge: str = "unpad"
    """anyres only: `unpad` (LLaVA-NeXT, transformers' LlavaNext: the crops' token grids joined into one
    map, cut to the image's own aspect, a learned newline embedding after each row, the base view first;
    the token count follows the image's size) or `flat` (every view's tokens in order, the same count
    per view). unpad needs a projector whose tokens form a square grid."""
    mean: tuple[float, float, float] | None = None
    """Normalisation mean; unset: the model's own (timm pretrained_cfg, hf preprocessor_config.json or
    per-model-type defaults)."""
    std: tuple[float, float, float] | None = None
    """Normalisation std; unset: the model's own, like `mean`."""
    towers: list[dict] = field(default_factory=list)
    """fused only: two or more towers, each a VisionConfig as a dict, whose token grids are the same
    size; their features are concatenated in this order."""
    kwargs: dict = field(default_factory=dict)
    """timm: extra `timm.create_model` arguments (patch_size, embed_dim, depth ...). hf: extra
    `from_pretrained` / `from_config` arguments (attn_implementation ...)."""

    def __post_init__(self) -> None:
        if self.anyres_merge not in ANYRES_MERGES:
            raise ValueError(f"unknown vision.anyres_merge {self.anyres_merge!r}; choose one of {list(ANYRES_MERGES)}")
        if self.anyres_merge != "unpad" and self.image_mode != "anyres":
            raise ValueError(
                f"vision.anyres_merge {self.anyres_merge!r} applies to image_mode anyres only, not {self.image_mode!r}"
            )


_COMMON_FIELDS = {"type", "feature_select", "image_size", "image_mode", "anyres_grids", "anyres_merge"}
USED_FIELDS = {
    "timm": _COMMON_FIELDS | {"name", "pretrained", "feature_layer", "mean", "std", "kwargs"},
    "hf": _COMMON_FIELDS
    | {"name", "pretrained", "config", "trust_remote_code", "feature_layer", "mean", "std", "kwargs"},
    "fused": _COMMON_FIELDS | {"towers"},
}
_DEFAULTS = VisionConfig()


def _check_fields(config: VisionConfig, where: str = "vision") -> None:
    """A field set for another tower type is a recipe mistake: say so instead of ignoring it."""
    used = USED_FIELDS.get(config.type, set())
    stray = [
        f.name
        for f in fields(VisionConfig)
        if f.name not in used and getattr(config, f.name) != getattr(_DEFAULTS, f.name)
    ]
    if stray:
        hint = "; set them on its towers" if config.type == "fused" else ""
        raise ValueError(f"{where}: type {config.type!r} does not use {stray}{hint}")


def _resolve_layer(feature_layer: int, depth: int, unit: str) -> int:
    layer = feature_layer if feature_layer >= 0 else depth + feature_layer
    if not 0 <= layer < depth:
        raise ValueError(
            f"feature_layer {feature_layer} is outside a {depth}-{unit} tower; choose {-depth}..{depth - 1} "
            f"(negative counts from the last {unit})"
        )
    return layer


def _check_size(size: int, patch: int, what: str, exact: bool) -> None:
    if size < patch:
        raise ValueError(f"image_size {size} is smaller than one {patch}-pixel {what}; use at least {patch}")
    if exact and size % patch:
        raise ValueError(
            f"image_size {size} is not a multiple of the {patch}-pixel {what}; use e.g. {size // patch * patch} "
            f"or {(size // patch + 1) * patch}"
        )


# ---- towers -------------------------------------------------------------------------------
class VisionTower(nn.Module):
    """What every tower shares: the transform settings, token counting and FSDP wrap units.

    Subclasses set `input_size`, `patch_size`, `default_mean`, `default_std` and implement
    `hidden_size`, `grid`, `num_prefix_tokens`, `wrap_modules` and `forward`.
    """

    type_name = ""
    input_size: int
    """Side of the square pixels `forward` takes."""
    patch_size: int
    """Pixels per token along a side (the patch size, or a CNN stage's stride)."""
    default_mean: tuple[float, float, float] = HALF
    default_std: tuple[float, float, float] = HALF

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        if config.type != self.type_name:
            raise ValueError(f"{type(self).__name__} builds type {self.type_name!r}, not {config.type!r}")
        _check_fields(config)
        if config.feature_select not in FEATURE_SELECTS:
            raise ValueError(f"unknown feature_select {config.feature_select!r}; choose one of {list(FEATURE_SELECTS)}")
        if config.image_mode not in IMAGE_MODES:
            raise ValueError(f"unknown image_mode {config.image_mode!r}; choose one of {list(IMAGE_MODES)}")
        self.image_mode = config.image_mode
        self.anyres_grids = tuple(tuple(grid) for grid in config.anyres_grids or ())
        self.anyres_merge = config.anyres_merge
        self.mean_override = config.mean
        self.std_override = config.std
        self.keep_prefix = config.feature_select == "cls_patch"

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    @property
    def grid(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def num_prefix_tokens(self) -> int:
        """CLS / register tokens kept before the patch grid in the output (0 for `patch`)."""
        raise NotImplementedError

    @property
    def num_tokens(self) -> int:
        h, w = self.grid
        return h * w + self.num_prefix_tokens

    def image_transform(self) -> ImageTransform:
        return ImageTransform(
            size=self.input_size,
            mean=tuple(self.mean_override or self.default_mean),
            std=tuple(self.std_override or self.default_std),
            mode=self.image_mode,
            grids=self.anyres_grids,
        )

    def wrap_modules(self) -> list[nn.Module]:
        """The repeated blocks, in forward order: the units FSDP2 shards one by one, and the blocks
        activation checkpointing wraps where they train (`src.training.sharding`), whatever the tower."""
        raise NotImplementedError

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
        self.layer = _resolve_layer(config.feature_layer, depth, unit)
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
            _check_size(self.input_size, self.patch_size, "patch", exact=False)
        else:
            self.patch_size = int(model.feature_info[self.layer]["reduction"])
            self.input_size = int(config.image_size or cfg.get("input_size", (3, 224, 224))[-1])
            _check_size(self.input_size, self.patch_size, f"stride of stage {self.layer}", exact=True)
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


@dataclass(frozen=True)
class HFFamily:
    """What differs between the transformers vision models we read."""

    model_class: str
    composite_type: str | None
    """model_type of the two-tower checkpoints holding this vision model (clip, siglip ...)."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layers: str
    """Attribute path of the encoder's block list."""
    stem: str
    """How pixels become the first layer's input: `clip` (embeddings, pre-layernorm), `siglip`
    (embeddings), `siglip2` (flattened patches plus spatial shapes) or `dinov2` (embeddings)."""
    cls_token: bool


HF_FAMILIES = {
    "clip_vision_model": HFFamily(
        "CLIPVisionModel", "clip", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "encoder.layers", "clip", True
    ),
    "siglip_vision_model": HFFamily("SiglipVisionModel", "siglip", HALF, HALF, "encoder.layers", "siglip", False),
    "siglip2_vision_model": HFFamily("Siglip2VisionModel", "siglip2", HALF, HALF, "encoder.layers", "siglip2", False),
    "dinov2": HFFamily("Dinov2Model", None, IMAGENET_MEAN, IMAGENET_STD, "encoder.layer", "dinov2", True),
    "dinov2_with_registers": HFFamily(
        "Dinov2WithRegistersModel", None, IMAGENET_MEAN, IMAGENET_STD, "encoder.layer", "dinov2", True
    ),
}
HF_COMPOSITES = {family.composite_type: kind for kind, family in HF_FAMILIES.items() if family.composite_type}
_RUNNING_CHILDREN = ("embeddings", "pre_layrnorm", "encoder")


def _read_preprocessor(name: str) -> dict:
    """The preprocessor_config.json of a hub id or folder, or {} when it has none."""
    from transformers.utils import cached_file

    path = cached_file(
        name,
        "preprocessor_config.json",
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if path is None:
        return {}
    with open(path) as handle:
        return json.load(handle)


def _preprocessor_size(preprocessor: dict) -> int | None:
    """The square the hub's processor feeds the model: its crop when it crops, else its resize."""
    size = preprocessor.get("crop_size") if preprocessor.get("do_center_crop") else preprocessor.get("size")
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        return size.get("height") or size.get("shortest_edge")
    return None


def _inline_hf_config(values: dict):
    """A transformers config from `vision.config`; unknown keys fail like `llm.config` does."""
    from transformers import AutoConfig

    values = dict(values)
    model_type = values.pop("model_type", None)
    if model_type not in HF_FAMILIES:
        raise ValueError(f"vision.config needs a model_type, one of {list(HF_FAMILIES)}; got {model_type!r}")
    known = AutoConfig.for_model(model_type).to_dict()
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"vision.config has keys that {model_type} configs do not know: {unknown}")
    return AutoConfig.for_model(model_type, **{key: _coerce(value, known[key]) for key, value in values.items()})


@VISION_TOWERS.register("hf")
class HFVisionTower(VisionTower):
    """A transformers vision model, read at `hidden_states[layer + 1]` (hidden_states[0] is the
    embeddings output), with the encoder layers after that one removed.

    `self.model` stays transformers' own class with every other submodule (embeddings,
    pre/post layernorms, pooling heads), so its state dict loads into that class, minus the
    removed layers; `self.layer` is the 0-based block read, `self.full_depth` the depth
    before pruning. The forward runs the embeddings and the kept encoder layers only: the
    post norms and heads would compute outputs nobody reads (DINOv2's and SigLIP's
    last_hidden_state are post-normed, so the raw block output is taken, as LLaVA does).
    """

    type_name = "hf"

    def __init__(self, config: VisionConfig) -> None:
        super().__init__(config)
        import transformers
        from transformers import AutoConfig

        if (config.name is None) == (not config.config):
            raise ValueError("vision type hf needs exactly one of name (hub id or folder) and config (inline)")
        preprocessor: dict = {}
        if config.name is None:
            if config.pretrained:
                raise ValueError("vision.pretrained needs a name (hub id or folder); an inline config starts random")
            hf_config = _inline_hf_config(config.config)
        else:
            hf_config = AutoConfig.from_pretrained(config.name, trust_remote_code=config.trust_remote_code)
            if hf_config.model_type in HF_COMPOSITES:  # e.g. a whole CLIP checkpoint: its vision half
                hf_config = hf_config.vision_config
            if hf_config.model_type not in HF_FAMILIES:
                raise ValueError(
                    f"vision type hf reads model types {list(HF_FAMILIES)} (or {list(HF_COMPOSITES)} checkpoints); "
                    f"{config.name!r} is {hf_config.model_type!r}"
                )
            preprocessor = _read_preprocessor(config.name)
        family = HF_FAMILIES[hf_config.model_type]
        model_class = getattr(transformers, family.model_class)
        if config.name is not None and config.pretrained is not False:
            self.model = model_class.from_pretrained(
                config.name, trust_remote_code=config.trust_remote_code, **config.kwargs
            )
        else:
            self.model = model_class._from_config(hf_config, **config.kwargs)
        self.family = family
        hf_config = self.model.config
        self.patch_size = int(hf_config.patch_size)
        if family.stem == "siglip2":  # no image size: a square of its position grid
            self.native_size = math.isqrt(hf_config.num_patches) * self.patch_size
        else:
            self.native_size = int(hf_config.image_size)
        self.input_size = int(config.image_size or _preprocessor_size(preprocessor) or self.native_size)
        _check_size(self.input_size, self.patch_size, "patch", exact=family.stem == "siglip2")
        self.default_mean = tuple(preprocessor.get("image_mean", family.mean))
        self.default_std = tuple(preprocessor.get("image_std", family.std))
        self.prefix_tokens = int(family.cls_token) + int(getattr(hf_config, "num_register_tokens", 0) or 0)
        if self.keep_prefix and self.prefix_tokens == 0:
            raise ValueError(
                f"feature_select cls_patch keeps prefix tokens but {hf_config.model_type} has none; use patch"
            )
        layers = self.model.get_submodule(family.layers)
        self.full_depth = len(layers)
        self.layer = _resolve_layer(config.feature_layer, self.full_depth, "layer")
        parent, attribute = family.layers.rsplit(".", 1)
        setattr(self.model.get_submodule(parent), attribute, layers[: self.layer + 1])
        hf_config.num_hidden_layers = self.layer + 1  # the config describes the model it sits on
        self._finish()

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.input_size // self.patch_size
        return (side, side)

    @property
    def num_prefix_tokens(self) -> int:
        return self.prefix_tokens if self.keep_prefix else 0

    def wrap_modules(self) -> list[nn.Module]:
        return list(self.model.get_submodule(self.family.layers))

    def unused_parameters(self) -> list[nn.Parameter]:
        """Post norms and pooling heads, and DINOv2's mask token (used only for masked pre-training)."""
        unused = [p for name, m in self.model.named_children() if name not in _RUNNING_CHILDREN for p in m.parameters()]
        mask_token = getattr(self.model.embeddings, "mask_token", None)
        return unused + ([mask_token] if isinstance(mask_token, nn.Parameter) else [])

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The input of the first encoder layer, i.e. transformers' hidden_states[0]."""
        embeddings, stem = self.model.embeddings, self.family.stem
        if stem == "siglip2":  # takes row-major flattened (p, p, C) patches, as its processor makes them
            n, c, h, w = pixel_values.shape
            p = self.patch_size
            patches = pixel_values.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
            shapes = torch.tensor([[h // p, w // p]], device=pixel_values.device).expand(n, 2)
            return embeddings(patches.reshape(n, (h // p) * (w // p), p * p * c), shapes)
        if stem == "dinov2":  # interpolates its position embeddings to any size itself
            return embeddings(pixel_values)
        hidden = embeddings(pixel_values, interpolate_pos_encoding=self.input_size != self.native_size)
        return self.model.pre_layrnorm(hidden) if stem == "clip" else hidden

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, 3, H, W) -> (images, tokens, hidden)."""
        hidden = self.model.encoder(self.embed(pixel_values)).last_hidden_state
        return hidden if self.keep_prefix else hidden[:, self.prefix_tokens :]


@VISION_TOWERS.register("fused")
class FusedVisionTower(VisionTower):
    """Several towers' patch features concatenated channel-wise (Prismatic's DINOv2 + SigLIP).

    The fused transform gives [0, 1] pixels (mean 0, std 1) at `image_size` (default: the
    largest tower's input); each tower resizes them to its own input size (bicubic,
    antialiased) and normalises with its own mean and std. The `pad` colour is the first
    tower's mean colour.
    """

    type_name = "fused"

    def __init__(self, config: VisionConfig) -> None:
        super().__init__(config)
        if self.keep_prefix:
            raise ValueError("a fused tower concatenates patch grids only; set feature_select: patch")
        if len(config.towers) < 2:
            raise ValueError(f"vision type fused needs at least two towers, got {len(config.towers)}")
        towers = []
        for index, options in enumerate(config.towers):
            where = f"vision.towers[{index}]"
            try:
                sub = options if isinstance(options, VisionConfig) else VisionConfig(**options)
            except TypeError as error:
                raise ValueError(f"{where}: {error}") from error
            if sub.type == "fused":
                raise ValueError(f"{where}: a fused tower's towers cannot be fused themselves")
            stray = [
                f for f in ("image_mode", "anyres_grids", "anyres_merge") if getattr(sub, f) != getattr(_DEFAULTS, f)
            ]
            if stray:
                raise ValueError(f"{where}: set {stray} on the fused config, which makes the pixels of all towers")
            if sub.feature_select != "patch":
                raise ValueError(f"{where}: a fused tower concatenates patch grids only; set feature_select: patch")
            towers.append(VISION_TOWERS.get(sub.type)(sub))
        first = towers[0]
        for index, tower in enumerate(towers[1:], start=1):
            if tower.grid != first.grid:
                suggestion = first.grid[0] * tower.patch_size
                raise ValueError(
                    f"fused towers make different token grids: towers[0] {first.grid} at {first.input_size} px and "
                    f"towers[{index}] {tower.grid} at {tower.input_size} px; set towers[{index}].image_size "
                    f"{suggestion} ({first.grid[0]} patches of {tower.patch_size} px) or towers[0].image_size "
                    f"{tower.grid[0] * first.patch_size}"
                )
        self.towers = nn.ModuleList(towers)
        self.input_size = int(config.image_size or max(t.input_size for t in towers))
        self.patch_size = self.input_size // first.grid[0]
        self.fill = first.image_transform().fill_colour
        # plain tuples, not buffers: nothing to lose when a sharded model is materialised from meta
        self.normalisation = [(t.image_transform().mean, t.image_transform().std) for t in towers]
        self._finish()

    @property
    def hidden_size(self) -> int:
        return sum(t.hidden_size for t in self.towers)

    @property
    def grid(self) -> tuple[int, int]:
        return self.towers[0].grid

    @property
    def num_prefix_tokens(self) -> int:
        return 0

    def image_transform(self) -> ImageTransform:
        return ImageTransform(
            self.input_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), self.image_mode, self.anyres_grids, self.fill
        )

    def wrap_modules(self) -> list[nn.Module]:
        return [module for tower in self.towers for module in tower.wrap_modules()]

    def unused_parameters(self) -> list[nn.Parameter]:
        return [param for tower in self.towers for param in tower.unused_parameters()]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, 3, H, W) of [0, 1] pixels -> (images, h * w, sum of the towers' hidden sizes)."""
        features = []
        for tower, (mean, std) in zip(self.towers, self.normalisation, strict=True):
            pixels = pixel_values.float()
            if pixels.shape[-2:] != (tower.input_size, tower.input_size):
                size = (tower.input_size, tower.input_size)
                pixels = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False, antialias=True)
            mean_t, std_t = (torch.tensor(v, device=pixels.device).view(1, 3, 1, 1) for v in (mean, std))
            features.append(tower(((pixels - mean_t) / std_t).to(pixel_values.dtype)))
        return torch.cat(features, dim=-1)


def build_vision_tower(config: VisionConfig) -> VisionTower:
    return VISION_TOWERS.get(config.type)(config)
