"""Prompts across the export boundary: the exported chat template renders the kit's prompt, and an
imported llava-hf model is prompted with the ids its own processor makes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from test_export import make_module

from src.data.conversation import ConversationEncoder, build_template
from src.export import chat_template_for, export, main

pytestmark = pytest.mark.usefixtures("single_thread")

# llava-hf/llava-1.5-7b-hf's processor chat template, as published (content is a list of parts)
LLAVA_HF = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
CHATS = [
    [("<image>\nWhat colour is the circle?", "red"), ("How many objects are there?", "two")],
    [("What is it?\n<image>", "A cat.")],
    [("Hello", "Hi"), ("Look <image> here", "A dog.")],
]


def parts(text: str) -> list[dict]:
    images = text.count("<image>")
    return [{"type": "image"}] * images + [{"type": "text", "text": text.replace("<image>", "").strip()}]


@pytest.mark.parametrize("template", ["vicuna_v1", "llama2", "plain"])
@pytest.mark.parametrize("system", [None, "", 'Be brief.\nSay "yes" — é'])
@pytest.mark.parametrize("shape", ["string", "parts"])
def test_exported_chat_template_renders_the_kits_prompt(tokenizer, template, system, shape):
    kit = build_template(template, system, tokenizer)
    exported = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    exported.chat_template = chat_template_for(template, system, tokenizer)
    for turns in CHATS[1:2] if template == "plain" else CHATS:  # plain: one turn
        rendered = kit.render(turns)
        messages = []
        for human, gpt in turns:
            content = parts(human) if shape == "parts" else human
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": gpt}]
        bos = tokenizer.bos_token  # the demo tokenizer does not add it; the kit's encoder does
        full = bos + "".join(text for turn in rendered for text, _ in turn)
        assert exported.apply_chat_template(messages, tokenize=False) == full
        last = rendered[-1]
        prompt = bos + "".join(t for turn in rendered[:-1] for t, _ in turn) + last[0][0]
        assert exported.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True) == prompt


def test_processor_ids_equal_the_kits_prompt_ids(demo_dir, tmp_path):
    from transformers import AutoProcessor

    module = make_module(demo_dir / "tokenizer")
    export(module, tmp_path / "hf", template="vicuna_v1", system_prompt=None)
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    encoder = ConversationEncoder(module.tokenizer, build_template("vicuna_v1", None), module.model.image_tokens)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    for turns in CHATS[:2]:
        chat = [m for h, g in turns for m in ({"from": "human", "value": h}, {"from": "gpt", "value": g})][:-1]
        ours = encoder.encode_prompt(chat, num_images=1)
        messages = [{"role": "user" if m["from"] == "human" else "assistant",
                     "content": parts(m["value"]) if m["from"] == "human" else m["value"]} for m in chat]  # fmt: skip
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        assert text == ours.text  # predict's JSONL prompt is the exported template's rendering
        ids = processor(text=text, images=image, return_tensors="pt")["input_ids"][0].tolist()
        assert ids == ours.input_ids
    generation = processor.tokenizer  # the tokenizer saved beside it carries the template for lmms-eval
    assert generation.chat_template == processor.chat_template


def test_export_needs_a_known_template(demo_dir, tmp_path):
    module = make_module(demo_dir / "tokenizer")
    with pytest.raises(ValueError, match="unknown conversation template 'vicuna'"):
        export(module, tmp_path / "hf", template="vicuna")
    assert not (tmp_path / "hf").exists()


@pytest.fixture
def sentencepiece_tokenizer(tmp_path):
    mistral_common = pytest.importorskip("mistral_common")
    from transformers import LlamaTokenizer

    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", tmp_path / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(tmp_path, legacy=False, add_bos_token=True)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    return tokenizer


def test_llava_hf_template_gives_the_processors_ids(sentencepiece_tokenizer):
    """llava-hf's template takes content as parts; the kit detects it, and tokenizes the text whole
    (no `▁` after `<image>`, unlike LLaVA's own tokenizer_image_token), as the processor does."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer = sentencepiece_tokenizer
    tokenizer.chat_template = LLAVA_HF
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_HF,
    )  # fmt: skip
    template = build_template("chat_template", None, tokenizer)
    assert template.content_parts
    encoder = ConversationEncoder(tokenizer, template, image_tokens=16)
    image = Image.new("RGB", (32, 32))
    for turns in CHATS:
        chat = [m for h, g in turns for m in ({"from": "human", "value": h}, {"from": "gpt", "value": g})][:-1]
        images = sum(m["value"].count("<image>") for m in chat)
        ours = encoder.encode_prompt(chat, num_images=images)
        messages = [{"role": "user" if m["from"] == "human" else "assistant", "content": parts(m["value"])}
                    for m in chat]  # fmt: skip
        theirs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True,
        )["input_ids"] if images == 0 else processor(
            text=processor.apply_chat_template(messages, add_generation_prompt=True),
            images=[image] * images, return_tensors="pt",
        )["input_ids"][0].tolist()  # fmt: skip
        theirs = theirs[0] if theirs and isinstance(theirs[0], list) else theirs
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        if len(chat) == 1:
            assert ours.input_ids == list(theirs)
        else:  # the kit ends every earlier reply with the eos it trained them with; llava-hf's text has none
            assert ours.text.replace("</s>", "") == tokenizer.bos_token + text and ours.input_ids != list(theirs)
    # training: the reply and its eos supervised, the template's trailing space is context
    full = encoder.encode([{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Red."}], 1)
    supervised = [t for t in full.labels if t >= 0]
    assert tokenizer.decode(supervised) == "Red.</s>"


def test_import_prompts_with_the_source_processors_template(demo_dir, tmp_path):
    from transformers import AutoProcessor

    source = make_module(demo_dir / "tokenizer", seed=3)
    export(source, tmp_path / "hf")
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    processor.chat_template = LLAVA_HF  # as llava-hf ships it: in the processor only
    processor.save_pretrained(tmp_path / "hf")
    assert main(["from-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    written = yaml.safe_load((tmp_path / "ours" / "model.yaml").read_text())
    assert written["data"] == {"template": "chat_template", "system_prompt": None}
    llm = written["model"]["llm"]["config"]
    tokenizer = source.tokenizer
    assert (llm["bos_token_id"], llm["eos_token_id"], llm["pad_token_id"]) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)  # fmt: skip
    from transformers import AutoTokenizer

    imported = AutoTokenizer.from_pretrained(written["model"]["tokenizer"])
    assert imported.chat_template == LLAVA_HF
    encoder = ConversationEncoder(imported, build_template("chat_template", None, imported), source.model.image_tokens)
    ours = encoder.encode_prompt([{"from": "human", "value": "<image>\nwhat colour is the circle"}], 1)
    messages = [{"role": "user", "content": parts("<image>\nwhat colour is the circle")}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    theirs = processor(text=text, images=Image.new("RGB", (32, 32)), return_tensors="pt")["input_ids"][0]
    assert ours.input_ids == theirs.tolist()
    assert torch.tensor(ours.input_ids).eq(source.image_token_id).sum() == source.model.image_tokens
