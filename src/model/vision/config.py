"""VisionConfig: what a recipe says about the tower (type, model, layer, pixels), one dataclass
for every family; which of its fields a family reads is that family's `config_fields`."""

from __future__ import annotations

from dataclasses import dataclass, field

FEATURE_SELECTS = ("patch", "cls_patch")
ANYRES_MERGES = ("unpad", "flat")
"""How anyres views become tokens (`src.model.anyres`): LLaVA-NeXT's `spatial_unpad` or its `flat`."""


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


DEFAULTS = VisionConfig()
"""Every field unset: a field that differs from it was set by the recipe."""


def as_vision_config(value: VisionConfig | dict, where: str = "vision") -> VisionConfig:
    """A tower config as the CLI gives it (a dataclass) or as a checkpoint or a fused tower's
    `towers` list holds it (a dict); an unknown key is named with where it was set."""
    if isinstance(value, VisionConfig):
        return value
    try:
        return VisionConfig(**value)
    except TypeError as error:
        raise ValueError(f"{where}: {error}") from error
