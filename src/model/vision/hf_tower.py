"""The `hf` family: a transformers vision model (CLIP, SigLIP, SigLIP2, DINOv2 with or without
registers) by hub id / folder or inline config, kept as transformers' own class so its weights
load from and export to transformers (a Llava folder)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from torch import nn

from src.model.hf_config import inline_fields
from src.model.image_transform import HALF, IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from src.model.vision.base import COMMON_FIELDS, VISION_TOWERS, VisionTower, check_size, resolve_layer
from src.model.vision.config import VisionConfig


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
    typed, _ = inline_fields(model_type, values, "vision.config")
    return AutoConfig.for_model(model_type, **typed)


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
    config_fields = COMMON_FIELDS | {
        "name", "pretrained", "config", "trust_remote_code", "feature_layer", "mean", "std", "kwargs",
    }  # fmt: skip

    @classmethod
    def weights_from_hub(cls, config: VisionConfig) -> bool:
        """A hub id or folder loads its weights unless `pretrained: false`; an inline config starts random."""
        return config.name is not None and config.pretrained is not False

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
        check_size(self.input_size, self.patch_size, "patch", exact=family.stem == "siglip2")
        self.default_mean = tuple(preprocessor.get("image_mean", family.mean))
        self.default_std = tuple(preprocessor.get("image_std", family.std))
        self.prefix_tokens = int(family.cls_token) + int(getattr(hf_config, "num_register_tokens", 0) or 0)
        if self.keep_prefix and self.prefix_tokens == 0:
            raise ValueError(
                f"feature_select cls_patch keeps prefix tokens but {hf_config.model_type} has none; use patch"
            )
        layers = self.model.get_submodule(family.layers)
        self.full_depth = len(layers)
        self.layer = resolve_layer(config.feature_layer, self.full_depth, "layer")
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
