"""The parts transformers' Llava and LlavaNext have in common, mapped both ways.

Both models are a vision tower, `multi_modal_projector` (linear_1 -> act -> linear_2) and a
causal LM; LlavaNext adds `image_newline` and its anyres settings. What maps onto either lives
here, once: the tower (a transformers CLIP or SigLIP at its own size), the projector (`linear`
or `mlp` of depth 1 or 2), the LLM (LoRA merged), the weights' assembly onto a model built on
the meta device, and on the way back the tower layers the kit prunes. `src.export` builds Llava
from them, `src.export_next` LlavaNext.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn

from src.core.constants import IMAGE_TAG
from src.model.llava import LlavaModel
from src.model.projector import LinearProjector, MLPProjector

EXPORTABLE_TOWERS = {"clip_vision_model": "CLIP", "siglip_vision_model": "SigLIP"}


class NotExportable(ValueError):
    """A part of the model has no place in transformers' Llava / LlavaNext."""


def hf_tower(model: LlavaModel, target: str = "Llava"):
    """The kit's tower and the transformers model in it, if transformers' `target` can hold it.

    `target` runs the tower at its config's `image_size` and never interpolates position
    embeddings, so a tower the kit runs at another size (`vision.image_size`) has no equal there."""
    tower = model.vision
    hf = getattr(tower, "model", None)
    model_type = getattr(getattr(hf, "config", None), "model_type", None)
    if model_type not in EXPORTABLE_TOWERS:
        kind = type(tower).__name__ if model_type is None else f"a transformers {model_type!r} tower"
        raise NotExportable(
            f"vision: {kind} does not map onto transformers' {target}, which needs a transformers CLIP or SigLIP "
            "tower (vision.type: hf with model_type clip_vision_model or siglip_vision_model)"
        )
    if tower.input_size != tower.native_size:
        raise NotExportable(
            f"vision: the kit runs this {EXPORTABLE_TOWERS[model_type]} tower at {tower.input_size} px (vision.image_size), "
            f"interpolating position embeddings made for {tower.native_size} px; transformers' {target} runs it at "
            f"its config's {tower.native_size} px without interpolating, so it would see other features"
        )
    return tower, hf


def select_strategy(tower, model_type: str) -> str:
    """`default` drops the one CLS token; `full` keeps every token (SigLIP has none)."""
    if model_type == "clip_vision_model":
        return "default" if tower.num_prefix_tokens == 0 else "full"
    return "full"


def projector_state(
    projector: nn.Module, llm_hidden: int, target: str = "Llava"
) -> tuple[dict[str, torch.Tensor], str]:
    """transformers' projector is always linear_1 -> act -> linear_2; a single linear map is
    linear_1, an identity activation and linear_2 = I (exact in float)."""
    if isinstance(projector, MLPProjector):
        linears = [m for m in projector.layers if isinstance(m, nn.Linear)]
        if len(linears) == 2:
            first, second = linears
            return {
                "linear_1.weight": first.weight,
                "linear_1.bias": first.bias,
                "linear_2.weight": second.weight,
                "linear_2.bias": second.bias,
            }, "gelu"
        if len(linears) != 1:
            raise NotExportable(
                f"projector: mlp of depth {len(linears)} does not map onto transformers' {target} (depth 1 or 2 does)"
            )
        single = linears[0]
    elif isinstance(projector, LinearProjector):
        single = projector.proj
    else:
        raise NotExportable(
            f"projector: {type(projector).__name__} does not map onto transformers' {target}; only `linear` and "
            "`mlp` (depth 1 or 2) do"
        )
    weight = single.weight
    return {
        "linear_1.weight": weight,
        "linear_1.bias": single.bias,
        "linear_2.weight": torch.eye(llm_hidden, dtype=weight.dtype, device=weight.device),
        "linear_2.bias": torch.zeros(llm_hidden, dtype=weight.dtype, device=weight.device),
    }, "linear"


def plain_llm(model: LlavaModel) -> nn.Module:
    """The causal LM with any LoRA adapter merged into its weights (in place, see `merge_lora`)."""
    from peft import PeftModel

    from src.model.lora import merge_lora

    return merge_lora(model) if isinstance(model.llm, PeftModel) else model.llm


def fill_runtime_buffers(hf: nn.Module, sources: dict[str, nn.Module]) -> None:
    """Non-persistent buffers (rotary frequencies, position ids) are not in any state dict:
    a model built on the meta device gets them from the modules it was made of."""
    for prefix, module in sources.items():
        for name, buffer in module.named_buffers():
            owner_name, _, leaf = f"{prefix}.{name}".rpartition(".")
            owner = hf.get_submodule(owner_name)
            if getattr(owner, leaf).is_meta:
                owner.register_buffer(leaf, buffer.detach().clone(), persistent=False)
    left = [name for name, b in hf.named_buffers() if b.is_meta]
    if left:
        raise NotExportable(f"buffers without values after export: {left[:5]}")


@dataclass
class Parts:
    """What the kit's model becomes in transformers' config and weights, before the model class is chosen."""

    vision_config: object
    text_config: object
    select_strategy: str
    projector_act: str
    state: dict[str, torch.Tensor]
    """Weights under transformers' names (`model.vision_tower.*`, `model.multi_modal_projector.*`,
    `model.language_model.*`, `lm_head.weight`)."""
    buffer_sources: dict[str, nn.Module]


def common_parts(model: LlavaModel, vocab_size: int | None = None, target: str = "Llava") -> Parts:
    """The tower, projector and LLM of `model` under transformers' names, shared, not copied.

    `vocab_size` (the tokenizer's length) drops the rows we pad the vocabulary with: they are
    hidden from our decoding by a hook that transformers would not have, so the exported
    model simply does not have them.
    """
    tower, hf = hf_tower(model, target)
    llm = plain_llm(model)
    text_config = copy.deepcopy(llm.config)
    rows = text_config.vocab_size if vocab_size is None else vocab_size
    text_config.vocab_size = rows
    projector, activation = projector_state(model.projector, text_config.hidden_size, target)
    vision_config = copy.deepcopy(hf.config)
    # our tower keeps only the blocks up to the feature layer: its last block is the one read
    vision_config.num_hidden_layers = tower.layer + 1
    decoder = llm.get_decoder()
    embeddings = decoder.get_input_embeddings().weight
    embed_key = next(k for k, v in decoder.named_parameters() if v is embeddings)
    state = {f"model.vision_tower.{k}": v for k, v in hf.state_dict().items()}
    state |= {f"model.multi_modal_projector.{k}": v for k, v in projector.items()}
    state |= {f"model.language_model.{k}": v for k, v in decoder.state_dict().items()}
    state[f"model.language_model.{embed_key}"] = embeddings[:rows]
    state["lm_head.weight"] = llm.get_output_embeddings().weight[:rows]
    return Parts(
        vision_config=vision_config,
        text_config=text_config,
        select_strategy=select_strategy(tower, hf.config.model_type),
        projector_act=activation,
        state=state,
        buffer_sources={"model.vision_tower": hf, "model.language_model": decoder},
    )


def assemble(model_class, config, parts: Parts, target: str) -> nn.Module:
    """`model_class(config)` built on the meta device and given `parts.state`, checked key for key."""
    with torch.device("meta"):
        hf = model_class(config)
    state = dict(parts.state)
    expected = set(hf.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
        state.pop("lm_head.weight")
    if missing or unexpected:
        raise NotExportable(
            f"weights do not match transformers' {target}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    hf.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        hf.tie_weights()
    fill_runtime_buffers(hf, parts.buffer_sources)
    return hf.eval()


# ---- transformers -> ours ---------------------------------------------------------------
def check_tower(folder, config) -> str:
    """The tower's model type, if the kit reads it, and its one feature layer."""
    vision_type = config.vision_config.model_type
    if vision_type not in EXPORTABLE_TOWERS:
        raise NotExportable(f"{folder}: vision tower {vision_type!r} is not one we read (CLIP, SigLIP)")
    if not isinstance(config.vision_feature_layer, int):
        raise NotExportable(f"{folder}: several feature layers {config.vision_feature_layer} are not supported")
    if config.projector_hidden_act != "gelu":
        raise NotExportable(f"{folder}: projector activation {config.projector_hidden_act!r} is not gelu (mlp)")
    return vision_type


def kit_state(hf: nn.Module, config) -> dict[str, torch.Tensor]:
    """Our state dict for a transformers Llava / LlavaNext model (no `image_newline`: the caller's).

    The kit's tower keeps the layers up to its feature layer only (a released llava-hf model
    reads hidden_states[-2] and holds one more): the layers after it are left out, so the
    weights fit the model `init_from` builds.
    """
    from transformers import AutoModelForCausalLM

    depth = config.vision_config.num_hidden_layers
    feature_layer = config.vision_feature_layer
    read = feature_layer if feature_layer >= 0 else depth + feature_layer
    pruned = re.compile(r"^encoder\.layers\.(\d+)\.")
    state = {
        f"vision.model.{k}": v
        for k, v in hf.model.vision_tower.state_dict().items()
        if not ((match := pruned.match(k)) and int(match.group(1)) > read)
    }
    projector = hf.model.multi_modal_projector
    state |= {
        "projector.layers.0.weight": projector.linear_1.weight,
        "projector.layers.0.bias": projector.linear_1.bias,
        "projector.layers.2.weight": projector.linear_2.weight,
        "projector.layers.2.bias": projector.linear_2.bias,
    }
    # our LLM is the causal-LM class: its decoder sits under that class's base-model prefix
    prefix = AutoModelForCausalLM._model_mapping[type(config.text_config)].base_model_prefix
    state |= {f"llm.{prefix}.{k}": v for k, v in hf.model.language_model.state_dict().items()}
    state["llm.lm_head.weight"] = hf.lm_head.weight  # the same tensor as the embeddings when tied
    return state


def kit_model_config(config, vision_type: str) -> dict:
    """Our `model:` vision (without image settings), projector and llm for a transformers Llava / LlavaNext config."""
    strategy = config.vision_feature_select_strategy
    has_cls = vision_type == "clip_vision_model"
    return {
        "vision": {
            "type": "hf",
            "config": config.vision_config.to_diff_dict() | {"model_type": vision_type},
            "feature_layer": int(config.vision_feature_layer),
            "feature_select": "cls_patch" if has_cls and strategy == "full" else "patch",
        },
        "projector": {"name": "mlp", "kwargs": {"depth": 2}},
        "llm": {"config": config.text_config.to_diff_dict() | {"model_type": config.text_config.model_type}},
    }


def processor_settings(module, hf, chat_template: str | None) -> dict:
    """What transformers' Llava and LlavaNext processors both take from a kit module and its exported
    model: the tokenizer, the tower's patch size and CLS count, the `<image>` token, the chat template."""
    tower_config = module.model.vision.model.config
    return {
        "tokenizer": module.tokenizer,
        "patch_size": tower_config.patch_size,
        "vision_feature_select_strategy": hf.config.vision_feature_select_strategy,
        "image_token": IMAGE_TAG,
        "num_additional_image_tokens": 1 if tower_config.model_type == "clip_vision_model" else 0,
        "chat_template": chat_template,
    }
