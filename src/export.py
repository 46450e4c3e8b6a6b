"""To and from transformers' own Llava format (`LlavaForConditionalGeneration`), and for
`image_mode: anyres` models its LlavaNext format (`LlavaNextForConditionalGeneration`, `src.export_next`).

A folder written by `to-hf` loads with `LlavaForConditionalGeneration` (or `LlavaNextForConditionalGeneration`,
or `AutoModelForImageTextToText`) `.from_pretrained` and `AutoProcessor.from_pretrained`, so vLLM, SGLang
and lmms-eval read it too. `from-hf` turns such a folder (e.g. `llava-hf/llava-1.5-7b-hf`,
`llava-hf/llava-v1.6-vicuna-7b-hf`) into our model config plus weights, so a released model can be
trained further with this kit.

Usage:
    python -m src.export to-hf --ckpt runs/x/last.ckpt --out exported/
    python -m src.export from-hf --hf llava-hf/llava-1.5-7b-hf --out imported/

`to-hf` also writes how the model was prompted and how it answers: a chat template that renders
the run's `data.template` and `data.system_prompt` (in the processor and the tokenizer, taking
message content as a string or as a processor's list of parts), and a generation config whose
bos / eos / pad ids are the tokenizer's, with the run's `model.generation` settings. `from-hf`
writes the source's chat template into the imported tokenizer and sets `data.template:
chat_template`, so an imported model is prompted with the tokens its processor would produce.

The image processor written is transformers' PIL backend, which makes the kit's pixels bit for
bit; transformers 5's `AutoProcessor` picks its torchvision backend when torchvision is installed
(another resize), and a folder cannot choose for it: pass `backend="pil"`.

Only parts that map onto transformers' Llava / LlavaNext are exported (`src.export_parts`): a
transformers CLIP or SigLIP tower at its own size, a `linear` or `mlp` (depth 1 or 2) projector, any
causal LM (LoRA merged first), and for anyres the `unpad` merge. For anything else the export stops
and names the part.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from src.data.conversation import TEMPLATES, build_template
from src.export_next import from_llava_next, llava_next_processor, to_llava_next
from src.export_parts import (
    NotExportable,
    assemble,
    check_tower,
    common_parts,
    kit_model_config,
    kit_state,
    processor_settings,
)
from src.model.language import LLMConfig
from src.model.llava import LlavaModel
from src.model.projector import ProjectorConfig
from src.model.vision import VisionConfig
from src.model.weights import NotACheckpoint, read_checkpoint

EXPORTABLE_IMAGE_MODES = ("resize", "resize_crop", "pad")


# ---- ours -> transformers ---------------------------------------------------------------
def to_transformers(model: LlavaModel, image_token_id: int, vocab_size: int | None = None):
    """Our model as a `LlavaForConditionalGeneration` (an anyres model: `LlavaNextForConditionalGeneration`,
    `src.export_next`) with the same weights (shared, not copied).

    `vocab_size` (the tokenizer's length) drops the rows we pad the vocabulary with: they are
    hidden from our decoding by a hook that transformers would not have, so the exported
    model simply does not have them.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    if model.anyres_layout is not None:
        return to_llava_next(model, image_token_id, vocab_size)
    parts = common_parts(model, vocab_size)
    config = LlavaConfig(
        vision_config=parts.vision_config.to_dict(),
        text_config=parts.text_config.to_dict(),
        image_token_index=image_token_id,
        image_seq_length=model.image_tokens,
        projector_hidden_act=parts.projector_act,
        vision_feature_select_strategy=parts.select_strategy,
        vision_feature_layer=-1,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(parts.text_config, "tie_word_embeddings", False)),
    )
    return assemble(LlavaForConditionalGeneration, config, parts, "Llava")


def image_processor_for(transform, patch_size: int):
    """transformers' Llava image processor doing what our transform does (PIL backend)."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    mode = getattr(transform, "mode", "resize")
    if mode not in EXPORTABLE_IMAGE_MODES:
        raise NotExportable(
            f"vision.image_mode {mode!r} has no transformers Llava processor; use one of {EXPORTABLE_IMAGE_MODES}"
        )
    size = int(transform.size)
    common = {"image_mean": list(transform.mean), "image_std": list(transform.std), "resample": 3}
    if mode == "resize_crop":
        return LlavaImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True, **common
        )
    return LlavaImageProcessorPil(
        size={"height": size, "width": size}, do_center_crop=False, do_pad=mode == "pad", **common
    )


# A message's content as the kit's LLaVA templates write it, from a string (lmms-eval's `llava_hf`,
# vLLM's chat with a plain string) or from a processor's list of parts (`processor.apply_chat_template`):
# parts become one `<image>` tag per image part and the text parts; then, as `image_first` does, a
# single tag moves to the front of the message followed by a newline, and several stay as written.
_CONTENT_MACRO = r"""{%- macro content(message) -%}
{%- if message['content'] is string -%}{%- set ns = namespace(text=message['content']) -%}
{%- else -%}{%- set ns = namespace(text='') -%}
{%- for part in message['content'] -%}
{%- if part['type'] == 'image' -%}{%- set ns.text = ns.text + '<image>
' -%}
{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}
{%- endfor -%}{%- endif -%}
{%- if ns.text.count('<image>') == 1 -%}{{ ('<image>
' + ns.text.replace('<image>', '').strip()).strip() }}
{%- else -%}{{ ns.text }}{%- endif -%}
{%- endmacro -%}
"""

_JINJA_TURNS = {
    # conv_vicuna_v1: "{system} USER: {q} ASSISTANT: {a}</s>USER: ..."
    "vicuna_v1": (
        "{%- for message in loop_messages -%}"
        "{%- if message['role'] == 'user' -%}{{ (system + ' ' if loop.first else '') + 'USER: ' + content(message) + ' ' }}"
        "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' + content(message) + '</s>' }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    ),
    # conv_llava_llama_2: "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{q} [/INST] {a} </s><s>[INST] ..."
    "llama2": (
        "{%- for message in loop_messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ ('' if loop.first else '<s>') + '[INST] ' + ('<<SYS>>\n' + system + '\n<</SYS>>\n\n' if loop.first and system else '')"
        " + content(message) + ' [/INST]' }}"
        "{%- elif message['role'] == 'assistant' -%}{{ ' ' + content(message) + ' </s>' }}{%- endif -%}"
        "{%- endfor -%}"
    ),
    # preprocess_plain: the image tags, then the caption and a newline; one turn (the first)
    "plain": (
        "{%- for message in loop_messages[:2] -%}"
        "{%- if message['role'] == 'user' -%}{{ '<image>' * content(message).count('<image>') }}"
        "{%- elif message['role'] == 'assistant' -%}{{ content(message) + '\n' }}{%- endif -%}"
        "{%- endfor -%}"
    ),
}


def _jinja_string(text: str) -> str:
    """A Jinja string literal holding `text` (Jinja reads Python-style escapes)."""
    return json.dumps(text, ensure_ascii=False)


def tokenizer_adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("x")["input_ids"][:1] == [bos]


def chat_template_for(template: str, system_prompt: str | None, tokenizer) -> str:
    """The Jinja chat template that renders what the kit's `template` (with `system_prompt`) renders,
    so `processor(text=processor.apply_chat_template(...))` gives the kit's prompt.

    The bos the kit's encoder prepends is written into the text only when the tokenizer does not add
    it itself, so tokenizing the rendered text the standard way (special tokens on) gives one bos.
    A system message in the chat replaces the run's system prompt. `chat_template` runs keep the
    tokenizer's own template; a run's system prompt becomes its default system message.
    """
    kit = build_template(template, system_prompt, tokenizer)
    if template == "chat_template":
        own = tokenizer.chat_template
        if system_prompt is None:
            return own
        default = "{'role': 'system', 'content': " + _jinja_string(system_prompt) + "}"
        return (
            "{%- if not messages or messages[0]['role'] != 'system' -%}"
            f"{{%- set messages = [{default}] + messages -%}}{{%- endif -%}}" + own
        )
    if template not in _JINJA_TURNS:
        raise NotExportable(f"template {template!r} has no chat template to export; known: {sorted(_JINJA_TURNS)}")
    system = getattr(kit, "system", "")
    bos = "{{- bos_token -}}" if kit.adds_bos and tokenizer.bos_token and not tokenizer_adds_bos(tokenizer) else ""
    return (
        _CONTENT_MACRO
        + f"{{%- set system = {_jinja_string(system)} -%}}"
        + "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = content(messages[0]) -%}{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}" + bos + _JINJA_TURNS[template]
    )


def generation_config_for(tokenizer, settings: dict | None = None):
    """transformers' GenerationConfig with the tokenizer's special-token ids (never a config's defaults:
    an inline Llama config says bos 1 / eos 2 whatever the tokenizer holds) and the run's settings."""
    from transformers import GenerationConfig

    settings = settings or {}
    options: dict = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    }
    if settings.get("max_new_tokens") is not None:
        options["max_new_tokens"] = int(settings["max_new_tokens"])
    temperature = float(settings.get("temperature") or 0.0)
    if temperature > 0:
        options |= {"do_sample": True, "temperature": temperature, "top_p": float(settings.get("top_p") or 1.0)}
    else:
        options["do_sample"] = False
    if settings.get("stop"):
        options["stop_strings"] = list(settings["stop"])  # generate(..., tokenizer=processor.tokenizer) reads them
    return GenerationConfig(**options)


def _set_special_tokens(config, tokenizer) -> None:
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, name, getattr(tokenizer, name))


def llava_processor(module, hf, chat_template: str | None):
    """transformers' LlavaProcessor making the kit's pixels and placeholders (its PIL image processor)."""
    from transformers import LlavaProcessor

    tower = module.model.vision
    return LlavaProcessor(
        image_processor=image_processor_for(tower.image_transform(), tower.model.config.patch_size),
        **processor_settings(module, hf, chat_template),
    )


def export(
    module, out: str | Path, dtype: str | None = None, template: str | None = None, system_prompt: str | None = None
) -> Path:
    """Writes model, tokenizer, processor and generation config of a built `LlavaLitModule` to `out`
    (a Llava folder; LlavaNext for `image_mode: anyres`); with `template` (the run's `data.template`),
    a chat template that prompts as the run did."""
    out = Path(out)
    if template is not None:
        TEMPLATES.get(template)  # an unknown name stops here, before any file is written
    module.configure_model()
    hf = to_transformers(module.model, module.image_token_id, len(module.tokenizer))
    tokenizer = module.tokenizer
    _set_special_tokens(hf.config.text_config, tokenizer)
    settings = module.generation_settings() if hasattr(module, "generation_settings") else None
    hf.generation_config = generation_config_for(tokenizer, settings)
    chat_template = None if template is None else chat_template_for(template, system_prompt, tokenizer)
    make_processor = llava_next_processor if module.model.anyres_layout is not None else llava_processor
    processor = make_processor(module, hf, chat_template)
    if dtype is not None:
        hf = hf.to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    processor.save_pretrained(out)
    if chat_template is not None:  # lmms-eval's llava_hf and vLLM's chat read the tokenizer's template
        saved = copy.copy(tokenizer)
        saved.chat_template = chat_template
        saved.save_pretrained(out)
    return out


# ---- transformers -> ours ---------------------------------------------------------------
def _image_settings(folder: str | Path) -> dict:
    """Our image mode, size, mean and std from the folder's image processor, when it has one."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(folder)
    except (OSError, ValueError):
        return {}
    crop = getattr(processor, "crop_size", None) or {}
    size = getattr(processor, "size", None) or {}
    if getattr(processor, "do_pad", False):
        mode = "pad"
    elif getattr(processor, "do_center_crop", False):
        mode = "resize_crop"
    else:
        mode = "resize"
    side = crop.get("height") if mode == "resize_crop" else size.get("height", size.get("shortest_edge"))
    settings = {"image_mode": mode, "mean": list(processor.image_mean), "std": list(processor.image_std)}
    return settings | ({"image_size": int(side)} if side else {})


def from_transformers(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our `model:` config and state dict for a transformers Llava or LlavaNext folder or hub id."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    config = AutoConfig.from_pretrained(folder)
    if config.model_type == "llava_next":
        return from_llava_next(folder, config)
    if config.model_type != "llava":
        raise NotExportable(f"{folder} holds a {config.model_type!r} model, not 'llava' or 'llava_next'")
    vision_type = check_tower(folder, config)
    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    model_config = kit_model_config(config, vision_type)
    model_config["vision"] |= _image_settings(folder)
    state = kit_state(hf, config)
    return model_config, {k: v.detach().clone() for k, v in state.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.export", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("to-hf", help="a checkpoint of this kit -> a transformers Llava folder")
    to_hf.add_argument("--ckpt", required=True, help="Lightning checkpoint of LlavaLitModule (file, or FSDP2 folder)")
    to_hf.add_argument("--out", required=True, help="folder to write")
    to_hf.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    to_hf.add_argument(
        "--template",
        default=None,
        help="the conversation template the model was trained with (default: the run's data.template, read from "
        f"the checkpoint); one of {TEMPLATES.names()}",
    )
    to_hf.add_argument(
        "--system-prompt", default=None, help="its system prompt (default: the run's data.system_prompt)"
    )
    from_hf = sub.add_parser("from-hf", help="a transformers Llava folder or hub id -> our config + weights")
    from_hf.add_argument("--hf", required=True, help="folder or hub id, e.g. llava-hf/llava-1.5-7b-hf")
    from_hf.add_argument("--out", required=True, help="folder to write model.yaml, weights.pt and tokenizer/")
    args = parser.parse_args(argv)
    try:
        if args.command == "to-hf":
            from src.training.module import LlavaLitModule

            checkpoint = read_checkpoint(args.ckpt, "--ckpt")  # a wrong file is one line, before Lightning reads it
            with single_file(args.ckpt) as ckpt:
                if not checkpoint:  # an FSDP2 folder: its consolidated file holds the run's data settings
                    checkpoint = torch.load(ckpt, map_location="cpu", mmap=True, weights_only=True)
                module = LlavaLitModule.load_from_checkpoint(ckpt, map_location="cpu")
            run = run_config(args.ckpt)
            template, system_prompt = prompt_settings(checkpoint, args.template, args.system_prompt, run)
            generation = (run.get("model") or {}).get("generation")
            if generation:  # not stored in checkpoints: the run's config.yaml says how predict generated
                from src.model.generation import GenerationConfig

                module.generation_config = GenerationConfig(**generation)
            print(f"wrote {export(module, args.out, args.dtype, template, system_prompt)}")
            if template is not None:
                print(f"chat template: data.template {template!r}, system prompt {system_prompt!r}")
        else:
            write_imported(args.hf, args.out)
            print(
                f"wrote {args.out}/model.yaml; train with: python -m src.cli fit --config YOUR.yaml --config {args.out}/model.yaml"
            )
    except (NotExportable, NotACheckpoint, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def run_config(ckpt: str | Path) -> dict:
    """The `config.yaml` LightningCLI saved in the run's folder (`version_N/checkpoints/x.ckpt` ->
    `version_N/config.yaml`), or {} when there is none."""
    for folder in Path(ckpt).resolve().parents[:2]:
        path = folder / "config.yaml"
        if path.is_file():
            return yaml.safe_load(path.read_text()) or {}
    return {}


def prompt_settings(
    checkpoint: dict, template: str | None, system_prompt: str | None, run: dict | None = None
) -> tuple[str | None, str | None]:
    """The template and system prompt the run trained with: given ones first, then the run's
    config.yaml, then the checkpoint's datamodule settings; None (and a warning) without any."""
    data = (run or {}).get("data") or checkpoint.get("datamodule_hyper_parameters") or {}
    if template is None:
        template = data.get("template")
        if system_prompt is None:
            system_prompt = data.get("system_prompt")
    if template is None:
        print(
            "warning: neither the checkpoint nor a config.yaml beside it says which data.template the model was "
            f"trained with, so no chat template is written; pass --template (one of {TEMPLATES.names()})",
            file=sys.stderr,
        )
    return template, system_prompt


@contextlib.contextmanager
def single_file(ckpt: str | Path):
    """A checkpoint as one file: FSDP2's distributed checkpoint folders are consolidated first
    (as `python -m lightning.pytorch.utilities.consolidate_checkpoint` does)."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        yield ckpt
        return
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    checkpoint = _load_distributed_checkpoint(ckpt)
    if "model" in checkpoint:  # FSDPStrategy's layout; ModelParallelStrategy writes state_dict
        checkpoint["state_dict"] = checkpoint.pop("model")
    optimizers = sorted(k for k in checkpoint if k.startswith("optimizer_") and k.removeprefix("optimizer_").isdigit())
    if optimizers:
        checkpoint["optimizer_states"] = [checkpoint.pop(k) for k in optimizers]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "consolidated.ckpt"
        torch.save(checkpoint, path)
        yield path


def source_chat_template(hf_folder: str | Path, tokenizer) -> str | None:
    """The chat template the source's processor prompts with (llava-hf keeps it in the processor), else
    its tokenizer's."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(hf_folder)
    except (OSError, ValueError, TypeError):
        processor = None
    return getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)


def write_imported(hf_folder: str | Path, out: str | Path) -> Path:
    """Writes `model.yaml` (the model, and the data template that prompts it as its processor does),
    `weights.pt` and `tokenizer/` (with the source's chat template) to `out`."""
    from transformers import AutoTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_config, state = from_transformers(hf_folder)
    tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    chat_template = source_chat_template(hf_folder, tokenizer)
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out / "tokenizer")
    # the text config's ids may be a config class's defaults; generation and padding use the tokenizer's
    model_config["llm"]["config"] |= {
        name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")
    }
    torch.save(state, out / "weights.pt")
    # every field written out, so this file overrides a whole part of any config it is merged after
    full = {
        "vision": asdict(VisionConfig(**model_config["vision"])),
        "projector": asdict(ProjectorConfig(**model_config["projector"])),
        "llm": asdict(LLMConfig(**model_config["llm"])),
    }
    for part in full.values():
        for key, value in part.items():
            if isinstance(value, tuple):
                part[key] = list(value)
    model_config = {"tokenizer": str(out / "tokenizer"), **full, "init_from": str(out / "weights.pt")}
    written: dict = {"model": model_config}
    if chat_template:  # the kit renders with the processor's own template and tokenizes the text whole, as it does
        written["data"] = {"template": "chat_template", "system_prompt": None}
    else:
        print(
            f"warning: {hf_folder} has no chat template; model.yaml leaves data.template to your config",
            file=sys.stderr,
        )
    (out / "model.yaml").write_text(yaml.safe_dump(written, sort_keys=False))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
