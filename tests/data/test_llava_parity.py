"""The LLaVA-named templates against the official LLaVA code, token for token.

The reference is the installed `llava-torch==1.2.2.post1` wheel (files identical to
haotian-liu/LLaVA for conversation.py, mm_utils.py and train/train.py). Its train.py does not
import under transformers 5, so `preprocess_multimodal`, `preprocess_v1`, `preprocess_plain` and
`preprocess_llama_2` are read from the installed file and executed with the module globals they
use; nothing of it is copied here. The tokenizer is a real Llama-style SentencePiece model
(Mistral-7B v0.1's, shipped in the `mistral-common` wheel), under both `legacy` settings.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("llava.conversation", reason="the official LLaVA wheel (llava-torch) is not installed")
pytest.importorskip("mistral_common", reason="mistral-common (the SentencePiece tokenizer file) is not installed")

import torch  # noqa: E402
from llava import conversation as official_conversation  # noqa: E402
from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from llava.mm_utils import tokenizer_image_token  # noqa: E402

from src.data.conversation import ConversationEncoder, VicunaTemplate, build_template, to_turns  # noqa: E402

IMAGE_TOKENS = 3
TEMPLATES = {"vicuna_v1": "vicuna_v1", "llama2": "llava_llama_2", "plain": "plain"}


def _official_functions() -> dict:
    """The official preprocess functions, executed from the installed train.py."""
    spec = importlib.util.find_spec("llava")
    source = (Path(spec.origin).parent / "train" / "train.py").read_text()
    wanted = {"preprocess_multimodal", "preprocess_v1", "preprocess_plain", "preprocess_llama_2"}
    tree = ast.parse(source)
    tree.body = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in wanted]
    namespace = {
        "torch": torch,
        "copy": copy,
        "Dict": dict,  # the official annotations name typing.Dict
        "Sequence": Sequence,
        "transformers": SimpleNamespace(PreTrainedTokenizer=object),
        "tokenizer_image_token": tokenizer_image_token,
        "IGNORE_INDEX": IGNORE_INDEX,
        "DEFAULT_IMAGE_TOKEN": DEFAULT_IMAGE_TOKEN,
        "DEFAULT_IM_START_TOKEN": "<im_start>",
        "DEFAULT_IM_END_TOKEN": "<im_end>",
        "IS_TOKENIZER_GREATER_THAN_0_14": True,  # tokenizers >= 0.14 is installed
        "conversation_lib": SimpleNamespace(
            SeparatorStyle=official_conversation.SeparatorStyle, default_conversation=None
        ),
    }
    exec(compile(tree, "llava/train/train.py", "exec"), namespace)  # noqa: S102 (the installed official code)
    assert wanted <= set(namespace)
    return namespace


OFFICIAL = _official_functions()


def official(template: str, messages: list[dict], tokenizer) -> tuple[list[int], list[int], str]:
    """Ids, labels and prompt text as LLaVA's training code makes them (`LazySupervisedDataset`)."""
    conv = official_conversation.conv_templates[TEMPLATES[template]]
    OFFICIAL["conversation_lib"].default_conversation = conv
    has_image = any(DEFAULT_IMAGE_TOKEN in m["value"] for m in messages)
    sources = [copy.deepcopy(messages)]
    if has_image:
        sources = OFFICIAL["preprocess_multimodal"](
            sources, SimpleNamespace(is_multimodal=True, mm_use_im_start_end=False)
        )
    if template == "plain":
        out = OFFICIAL["preprocess_plain"](sources, tokenizer)
        text = sources[0][0]["value"] + sources[0][1]["value"] + conv.sep
    else:
        function = OFFICIAL["preprocess_v1" if template == "vicuna_v1" else "preprocess_llama_2"]
        out = function(sources, tokenizer, has_image=has_image)
        prompt = conv.copy()
        prompt.messages = []
        for j, message in enumerate(sources[0]):
            prompt.append_message(prompt.roles[j % 2], message["value"])
        text = prompt.get_prompt()
    return out["input_ids"][0].tolist(), out["labels"][0].tolist(), text


def kit_as_official(encoded, image_id: int) -> tuple[list[int], list[int]]:
    """The kit's ids and labels with each image's placeholder run written as LLaVA's one -200."""
    ids, labels = [], []
    for i, (token, label) in enumerate(zip(encoded.input_ids, encoded.labels, strict=True)):
        if token == image_id and i > 0 and encoded.input_ids[i - 1] == image_id:
            continue
        ids.append(IMAGE_TOKEN_INDEX if token == image_id else token)
        labels.append(IGNORE_INDEX if token == image_id else label)
    return ids, labels


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "non-legacy"])
def llama_tokenizer(request, tmp_path_factory):
    """Mistral-7B v0.1's SentencePiece model as a Llama tokenizer; vicuna-7b-v1.5 uses legacy=False."""
    import mistral_common
    from transformers import LlamaTokenizer

    folder = tmp_path_factory.mktemp("spm")
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(folder, legacy=request.param, add_bos_token=True)
    tokenizer.add_tokens([DEFAULT_IMAGE_TOKEN], special_tokens=True)
    tokenizer.pad_token = tokenizer.unk_token  # LLaVA-1.5 pads with unk
    tokenizer.model_max_length = 2048
    assert len(tokenizer) == 32001 and tokenizer.legacy is request.param
    return tokenizer


def chat(*pairs: tuple[str, str]) -> list[dict]:
    return [m for human, gpt in pairs for m in ({"from": "human", "value": human}, {"from": "gpt", "value": gpt})]


CONVERSATIONS = {
    "one turn, tag first": chat(("<image>\nWhat colour is the square?", "It is red.")),
    "tag last": chat(("What is in the picture?\n<image>", "A cat on a mat.")),
    "tag in the middle": chat(("Look at this <image> and tell me: what is it?", "A dog.")),
    "tag with no newline": chat(("<image>Describe the scene.", "Two boats on a lake.")),
    "text only": chat(("What is two plus two?", "Four.")),
    "text only, multi-turn": chat(("Hi there.", "Hello! How can I help?"), ("Name a colour.", "Blue.")),
    "three turns": chat(
        ("<image>\nWhat colour is the square?", "It is red."),
        ("How many objects are there?", "There are two."),
        ("What shape is the red object?", "It is a circle."),
    ),
    "image in the second turn": chat(("Hello.", "Hi."), ("What is shown here? <image>", "A red circle.")),
    "two images in two turns": chat(("<image>\nFirst picture?", "A cat."), ("And this one?\n<image>", "A dog.")),
    "replies with newlines and numbers": chat(
        ("<image>\nList the objects.", "1. a cube\n2. a ball\n\nThat is all."), ("Sure?", "Yes, 100%.")
    ),
    "template words in the text": chat(
        ("<image>\nSay USER: and [INST] please.", "USER: and [INST] and ASSISTANT and <<SYS>>."),
        ("What does the assistant say?", "The assistant says hello."),
    ),
    "unicode and spaces": chat(("<image>\n  Qu'est-ce que c'est ?  ", "C'est un château — très beau.")),
}


@pytest.mark.parametrize("template", ["vicuna_v1", "llama2"])
@pytest.mark.parametrize("system", [None, "", "Be brief."])
@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_ids_and_labels_equal_the_official_code(llama_tokenizer, template, system, case):
    messages = CONVERSATIONS[case]
    conv = official_conversation.conv_templates[TEMPLATES[template]]
    if system is not None:
        conv.system, saved = system, conv.system
    try:
        ids, labels, _ = official(template, messages, llama_tokenizer)
    finally:
        if system is not None:
            conv.system = saved
    assert any(label != IGNORE_INDEX for label in labels), "the official code masked the whole sample"
    encoder = ConversationEncoder(
        llama_tokenizer, build_template(template, system), image_tokens=IMAGE_TOKENS, max_length=10**6
    )
    num_images = sum(m["value"].count(DEFAULT_IMAGE_TOKEN) for m in messages)
    encoded = encoder.encode(messages, num_images=num_images)
    assert encoded.input_ids.count(encoder.image_token_id) == IMAGE_TOKENS * num_images
    assert kit_as_official(encoded, encoder.image_token_id) == (ids, labels)


@pytest.mark.parametrize(
    "case", ["one turn, tag first", "tag last", "tag in the middle", "tag with no newline", "unicode and spaces"]
)
def test_plain_equals_preprocess_plain(llama_tokenizer, case):
    messages = CONVERSATIONS[case]
    ids, labels, text = official("plain", messages, llama_tokenizer)
    encoder = ConversationEncoder(llama_tokenizer, build_template("plain"), image_tokens=IMAGE_TOKENS)
    encoded = encoder.encode(messages, num_images=1)
    assert kit_as_official(encoded, encoder.image_token_id) == (ids, labels)
    # the caption and its newline are supervised, no eos
    supervised = [label for label in labels if label != IGNORE_INDEX]
    assert llama_tokenizer.decode(supervised) == messages[1]["value"] + "\n"
    assert llama_tokenizer.eos_token_id not in encoded.input_ids


@pytest.mark.parametrize("template", ["vicuna_v1", "llama2"])
@pytest.mark.parametrize("case", ["three turns", "two images in two turns", "template words in the text"])
def test_prompt_text_is_the_official_prompt(llama_tokenizer, template, case):
    """The rendered text is `Conversation.get_prompt()` after `preprocess_multimodal`."""
    messages = CONVERSATIONS[case]
    _, _, text = official(template, messages, llama_tokenizer)
    rendered = build_template(template).render(to_turns(messages))
    ours = "".join(segment for turn in rendered for segment, _ in turn)
    assert ours == text  # llama2: LLaVA strips the leading <s> from the text; the tokenizer adds it as bos


def test_vicuna_v1_system_prompt_is_llavas():
    assert VicunaTemplate.DEFAULT_SYSTEM == official_conversation.conv_vicuna_v1.system
    assert official_conversation.conv_templates["vicuna_v1"].system == VicunaTemplate.DEFAULT_SYSTEM


def test_the_ids_that_tokenizing_segments_alone_got_wrong():
    """Under legacy=False (vicuna-7b-v1.5's setting) context changes the ids: these are LLaVA's."""
    import mistral_common
    from transformers import LlamaTokenizer

    folder = Path(mistral_common.__file__).parent / "data"
    tmp = Path(__import__("tempfile").mkdtemp())
    shutil.copy(folder / "tokenizer.model.v1", tmp / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(tmp, legacy=False, add_bos_token=True)
    tokenizer.add_tokens([DEFAULT_IMAGE_TOKEN], special_tokens=True)
    messages = chat(("<image>\nWhat?", "Red."), ("Why?", "Because."))
    pieces = {}
    for template in ("vicuna_v1", "llama2"):
        encoded = ConversationEncoder(tokenizer, build_template(template), image_tokens=1).encode(messages, 1)
        pieces[template] = tokenizer.convert_ids_to_tokens(encoded.input_ids)
    vicuna = pieces["vicuna_v1"]
    image = vicuna.index(DEFAULT_IMAGE_TOKEN)
    assert vicuna[image : image + 3] == [DEFAULT_IMAGE_TOKEN, "▁", "<0x0A>"]
    eos = vicuna.index("</s>")
    assert vicuna[eos : eos + 3] == ["</s>", "USER", ":"]
    assert pieces["llama2"][:3] == ["<s>", "▁[", "INST"]
    assert pieces["llama2"].count("<s>") == 2


@pytest.mark.parametrize(
    ("template", "reply"),
    [("vicuna_v1", "Type ASSISTANT: then your answer."), ("llama2", "Write [/INST] then your answer.")],
)
def test_a_reply_holding_the_round_separator_is_trained_not_dropped(llama_tokenizer, template, reply):
    """A deliberate difference: LLaVA splits rounds on its separator text, so a reply that contains
    it breaks the length arithmetic and the whole sample is masked ("tokenization mismatch").
    The kit knows its spans and supervises the reply; the ids are still LLaVA's."""
    messages = chat(("<image>\nHow do I use the template?", reply))
    ids, labels, _ = official(template, messages, llama_tokenizer)
    assert set(labels) == {IGNORE_INDEX}
    encoder = ConversationEncoder(llama_tokenizer, build_template(template), image_tokens=IMAGE_TOKENS)
    encoded = encoder.encode(messages, num_images=1)
    kit_ids, kit_labels = kit_as_official(encoded, encoder.image_token_id)
    assert kit_ids == ids
    supervised = [label for label in kit_labels if label != IGNORE_INDEX]
    assert llama_tokenizer.decode(supervised).strip() == reply + (" </s>" if template == "llama2" else "</s>")


def test_several_tags_in_one_message_stay_in_place(llama_tokenizer):
    """A deliberate difference: LLaVA's `preprocess_multimodal` collapses several tags of one message
    into one (it supports one image per sample), so the images would not match the tags. The kit
    leaves such a message as written (as LLaVA-NeXT does); its ids are then `preprocess_v1`'s
    on the message as written."""
    messages = chat(("Compare <image> with <image> please.", "The first is larger."))
    encoder = ConversationEncoder(llama_tokenizer, build_template("vicuna_v1"), image_tokens=IMAGE_TOKENS)
    encoded = encoder.encode(messages, num_images=2)
    OFFICIAL["conversation_lib"].default_conversation = official_conversation.conv_vicuna_v1
    out = OFFICIAL["preprocess_v1"]([copy.deepcopy(messages)], llama_tokenizer, has_image=True)
    assert kit_as_official(encoded, encoder.image_token_id) == (out["input_ids"][0].tolist(), out["labels"][0].tolist())
    collapsed = OFFICIAL["preprocess_multimodal"](
        [copy.deepcopy(messages)], SimpleNamespace(is_multimodal=True, mm_use_im_start_end=False)
    )
    assert collapsed[0][0]["value"] == "<image>\nCompare  with  please."
