"""To and from transformers' LlavaNext format (`LlavaNextForConditionalGeneration`): the kit's
`image_mode: anyres` with `anyres_merge: unpad`.

transformers' LlavaNext is LLaVA-NeXT's `spatial_unpad` merge and nothing else: the crops' token
grids joined, cut to the image's aspect, a learned `image_newline` after every row, the base view
first (`src.model.anyres` is the kit's, equal to it token for token). So an anyres model exports
when its merge is `unpad` and its tower, projector and LLM map as for Llava (`src.export_parts`);
a `flat` model does not (LlavaNext has no flat merge).

The folder's image processor is `LlavaNextImageProcessor` with the kit's crop size, canvases
(`image_grid_pinpoints`, [height, width] where the kit writes [width, height]), mean and std.
Its PIL backend makes the kit's pixels bit for bit; transformers 5's `AutoProcessor` picks the
torchvision backend when torchvision is installed (an antialiased resize: other pixels), and a
saved folder cannot choose for it, so load it with `AutoProcessor.from_pretrained(folder,
backend="pil")`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from src.export_parts import (
    NotExportable,
    assemble,
    check_tower,
    common_parts,
    kit_model_config,
    kit_state,
    processor_settings,
)
from src.model.llava import LlavaModel

TARGET = "LlavaNext"
NEWLINE = "model.image_newline"  # transformers' LlavaNextModel.image_newline
KIT_NEWLINE = "projector.anyres.image_newline"  # the kit's ImageNewline, a module of the projector


def pinpoints(grids) -> list[list[int]]:
    """The kit's canvases (width, height) as transformers' `image_grid_pinpoints` ([height, width])."""
    return [[int(height), int(width)] for width, height in grids]


def grids_from(pinpoints_hw) -> list[list[int]]:
    """transformers' `image_grid_pinpoints` ([height, width]) as the kit's `anyres_grids` ([width, height])."""
    return [[int(width), int(height)] for height, width in pinpoints_hw]


def to_llava_next(model: LlavaModel, image_token_id: int, vocab_size: int | None = None):
    """An anyres + unpad model as a `LlavaNextForConditionalGeneration` with the same weights (shared)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    layout = model.anyres_layout
    if layout is None or layout.merge != "unpad":
        merge = "no anyres" if layout is None else f"anyres_merge {layout.merge!r}"
        raise NotExportable(
            f"vision: {merge} has no transformers LlavaNext equivalent: LlavaNext always merges an image's views "
            "LLaVA-NeXT's spatial_unpad way (crops joined and cut to the image's aspect, a learned newline after "
            "each row, the base view first), so a model trained with another merge would be given other tokens; "
            "train with vision.image_mode anyres and anyres_merge unpad to export to LlavaNext"
        )
    parts = common_parts(model, vocab_size, TARGET)
    parts.state[NEWLINE] = model.projector.anyres.image_newline
    config = LlavaNextConfig(
        vision_config=parts.vision_config.to_dict(),
        text_config=parts.text_config.to_dict(),
        image_token_index=image_token_id,
        image_seq_length=layout.view_tokens,
        image_grid_pinpoints=pinpoints(layout.grids),
        projector_hidden_act=parts.projector_act,
        vision_feature_select_strategy=parts.select_strategy,
        vision_feature_layer=-1,  # the kit's tower ends at the layer it reads
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(parts.text_config, "tie_word_embeddings", False)),
    )
    return assemble(LlavaNextForConditionalGeneration, config, parts, TARGET)


def llava_next_image_processor(transform):
    """`LlavaNextImageProcessorPil` making the kit's anyres views bit for bit (tests/model/test_image_transform.py):
    the base view squashed to the crop size, then the canvas' crops row by row."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    size = int(transform.size)
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=pinpoints(transform.grids),
        image_mean=list(transform.mean),
        image_std=list(transform.std),
        resample=3,  # bicubic, as the kit
    )


def llava_next_processor(module, hf, chat_template: str | None):
    """transformers' LlavaNextProcessor: the kit's pixels, and as many `<image>` placeholders per image as the kit's
    `AnyresLayout` counts (its `_get_number_of_features`, less the CLS the `default` strategy drops)."""
    from transformers import LlavaNextProcessor

    return LlavaNextProcessor(
        image_processor=llava_next_image_processor(module.model.vision.image_transform()),
        **processor_settings(module, hf, chat_template),
    )


# ---- transformers -> ours ---------------------------------------------------------------
def _image_settings(folder: str | Path, config) -> dict:
    """Our anyres settings from the folder's config and (for mean and std) its image processor."""
    from transformers import AutoImageProcessor

    crop = int(config.vision_config.image_size)
    settings = {
        "image_mode": "anyres",
        "anyres_merge": "unpad",
        "anyres_grids": grids_from(config.image_grid_pinpoints),
        "image_size": crop,
    }
    try:
        processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    except (OSError, ValueError):
        return settings
    crop_size = getattr(processor, "crop_size", None) or {}
    sides = {
        crop_size.get("height", crop),
        crop_size.get("width", crop),
        (processor.size or {}).get("shortest_edge", crop),
    }
    if sides != {crop}:
        raise NotExportable(
            f"{folder}: its image processor makes {crop_size} crops (size {processor.size}) but the tower reads "
            f"{crop} px views; the kit's anyres cuts views of the tower's size"
        )
    if pinpoints(grids_from(processor.image_grid_pinpoints)) != pinpoints(grids_from(config.image_grid_pinpoints)):
        raise NotExportable(
            f"{folder}: the image processor's image_grid_pinpoints {processor.image_grid_pinpoints} differ from the "
            f"model's {config.image_grid_pinpoints}"
        )
    return settings | {"mean": list(processor.image_mean), "std": list(processor.image_std)}


def from_llava_next(folder: str | Path, config) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our `model:` config (anyres, unpad, the folder's canvases) and state dict (with `image_newline`)
    for a transformers LlavaNext folder or hub id."""
    from transformers import LlavaNextForConditionalGeneration

    vision_type = check_tower(folder, config)
    model_config = kit_model_config(config, vision_type)
    if model_config["vision"]["feature_select"] != "patch":
        raise NotExportable(
            f"{folder}: vision_feature_select_strategy 'full' keeps CLIP's CLS token, so a view's tokens are not a "
            "square grid and the unpad merge cannot lay them out (transformers' LlavaNext cannot either)"
        )
    model_config["vision"] |= _image_settings(folder, config)
    hf = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    state = kit_state(hf, config)
    state[KIT_NEWLINE] = hf.model.image_newline
    return model_config, {k: v.detach().clone() for k, v in state.items() if v is not None}
