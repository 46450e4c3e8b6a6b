"""src.data.conversation: templates, image-tag expansion, label masks and truncation."""

from __future__ import annotations

import re

import pytest

from src.data.conversation import (
    IGNORE_INDEX,
    MC_FORMATS,
    MC_INSTRUCTION,
    ChatTemplate,
    ConversationEncoder,
    Llama2Template,
    PlainTemplate,
    SampleError,
    VicunaTemplate,
    build_template,
    image_first,
    multiple_choice_answer,
    multiple_choice_prompt,
    to_turns,
)

Q1, A1 = "<image>\nWhat colour is the square?", "It is red."
Q2, A2 = "How many objects are there?", "There are two."
Q3, A3 = "What shape is the red object?", "It is a circle."
IMAGE = "<image>"


def chat(*pairs: tuple[str, str]) -> list[dict]:
    messages = []
    for human, gpt in pairs:
        messages += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    return messages


def supervised_runs(encoded) -> list[list[int]]:
    """Contiguous runs of supervised label ids."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in encoded.labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def tokens(tokenizer, ids) -> list[str]:
    return tokenizer.convert_ids_to_tokens(list(ids))


# --- prompts and turns ---------------------------------------------------------------------


def test_multiple_choice_prompt_format():
    assert multiple_choice_prompt("Which?", ["red", "blue", "green"]) == (
        f"Which?\nA. red\nB. blue\nC. green\n{MC_INSTRUCTION}"
    )


@pytest.mark.parametrize("n", [0, 1, 9])
def test_multiple_choice_prompt_option_count(n):
    with pytest.raises(ValueError, match=re.escape(f"a question needs 2 to 8 options, got {n}")):
        multiple_choice_prompt("Which?", [str(i) for i in range(n)])


def test_reasoned_prompt_and_answers():
    assert (
        multiple_choice_prompt("Which?", ["red", "blue"], "reasoned")
        == f"Which?\nA. red\nB. blue\n{MC_FORMATS['reasoned']}"
    )
    assert multiple_choice_answer(["red", "blue", "green"], 1) == "B"
    assert multiple_choice_answer(["red", "blue", "green"], 2, "letter") == "C"
    assert multiple_choice_answer(["red", "blue", "green"], 2, "reasoned") == "green. The answer is C."
    for call in (
        lambda: multiple_choice_prompt("q", ["a", "b"], "free"),
        lambda: multiple_choice_answer(["a", "b"], 0, "free"),
    ):
        with pytest.raises(
            ValueError,
            match=re.escape("unknown multiple-choice format 'free'; choose one of ['letter', 'option', 'reasoned']"),
        ):
            call()


def test_the_three_formats():
    assert list(MC_FORMATS) == ["letter", "option", "reasoned"]
    assert MC_FORMATS["letter"] == MC_INSTRUCTION
    assert len(set(MC_FORMATS.values())) == 3  # the instruction tells the formats apart
    for fmt, instruction in MC_FORMATS.items():
        assert multiple_choice_prompt("Which?", ["red", "blue"], fmt) == f"Which?\nA. red\nB. blue\n{instruction}"


def test_option_answers_are_the_option_text():
    options = ["red", "blue square", "green"]
    assert [multiple_choice_answer(options, k, "option") for k in range(3)] == options


def test_to_turns_pairs_drops_system_and_trailing_question():
    messages = (
        [{"from": "system", "value": "be nice"}] + chat((Q1, A1), (Q2, A2)) + [{"from": "human", "value": "And?"}]
    )
    assert to_turns(messages) == [(Q1, A1), (Q2, A2)]


def test_to_turns_accepts_user_assistant_roles():
    messages = [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]
    assert to_turns(messages) == [("q", "a")]


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([], "empty_conversation"),
        (None, "bad_conversation"),
        ("hello", "bad_conversation"),
        ([{"from": "human", "value": "only a question"}], "empty_conversation"),
        ([{"from": "system", "value": "s"}], "empty_conversation"),
        (chat(("q", "   ")), "empty_conversation"),
        ([{"from": "human", "value": None}, {"from": "gpt", "value": "a"}], "empty_conversation"),
        ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}], "bad_conversation"),
        ([{"from": "human", "value": "q"}, {"from": "human", "value": "q"}], "bad_conversation"),
        ([{"from": "human", "value": "q"}, "a"], "bad_conversation"),
    ],
)
def test_to_turns_rejects_unusable_chats(messages, reason):
    with pytest.raises(SampleError) as info:
        to_turns(messages)
    assert info.value.reason == reason
    assert str(info.value).startswith(f"{reason}: ")


@pytest.mark.parametrize(
    "messages",
    [
        ["What colour is the square?", "red"],
        [{"from": "system", "value": "s"}, "q", {"from": "gpt", "value": "a"}],
        [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, None],  # even a trailing one
        [["human", "q"], ["gpt", "a"]],
    ],
)
def test_to_turns_non_dict_messages_are_a_sample_error(messages):
    with pytest.raises(SampleError) as info:
        to_turns(messages)
    assert info.value.reason == "bad_conversation"
    assert str(info.value) == "bad_conversation: messages must be objects with 'from' and 'value'"


def test_build_template():
    assert isinstance(build_template("plain"), PlainTemplate)
    assert build_template("vicuna_v1").system == VicunaTemplate.DEFAULT_SYSTEM
    assert build_template("vicuna_v1", "").system == ""
    assert build_template("vicuna_v1", "Be brief.").system == "Be brief."
    assert build_template("llama2").system == Llama2Template.DEFAULT_SYSTEM
    assert build_template("llama2", "").system == ""
    assert build_template("llama2", "Be brief.", tokenizer=None).system == "Be brief."
    with pytest.raises(
        ValueError,
        match=re.escape(
            "unknown conversation template 'Plain'; choose one of ['chat_template', 'llama2', 'plain', 'vicuna_v1']"
        ),
    ):
        build_template("Plain")


def test_vicuna_render_segments():
    """LLaVA's text: replies are not stripped, `</s>` is written in the text, and an empty system
    prompt leaves its separating space (as `Conversation.get_prompt` does)."""
    segments = VicunaTemplate("SYS").render([(Q1, " " + A1 + " "), (Q2, A2)])
    assert segments == [
        [(f"SYS USER: {Q1} ASSISTANT:", False), (f"  {A1} </s>", True)],
        [(f"USER: {Q2} ASSISTANT:", False), (f" {A2}</s>", True)],
    ]
    assert VicunaTemplate("").render([(Q2, A2)]) == [[(f" USER: {Q2} ASSISTANT:", False), (f" {A2}</s>", True)]]


def test_vicuna_default_system_is_llava_15s():
    assert VicunaTemplate.DEFAULT_SYSTEM == (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )


@pytest.mark.parametrize(
    ("human", "moved"),
    [
        ("<image>\nWhat is it?", "<image>\nWhat is it?"),
        ("What is it?\n<image>", "<image>\nWhat is it?"),
        ("What is <image> this?", "<image>\nWhat is  this?"),
        ("<image>What is it?  ", "<image>\nWhat is it?"),
        ("  <image>  ", "<image>"),
        ("No image here. ", "No image here. "),  # untouched, not even stripped
        ("<image> and <image>", "<image> and <image>"),  # several tags stay where they are
    ],
)
def test_llava_templates_move_the_image_tag_to_the_front(human, moved):
    """As LLaVA's `preprocess_multimodal`: the tag first, a newline, the rest stripped."""
    assert image_first(human) == moved
    assert VicunaTemplate("S").render([(human, A1)])[0][0] == (f"S USER: {moved} ASSISTANT:", False)
    assert Llama2Template("").render([(human, A1)])[0][0] == (f"[INST] {moved} [/INST]", False)


def test_plain_render_keeps_only_tags_and_first_answer():
    """LLaVA's `preprocess_plain`: the caption as written, then `\n`, supervised; no eos."""
    segments = PlainTemplate().render([("Look: <image> and <image> please", " A caption. "), (Q2, A2)])
    assert segments == [[("<image><image>", False), (" A caption. \n", True)]]


# --- the encoder ---------------------------------------------------------------------------


def test_vicuna_exact_tokens_and_mask(make_encoder, tokenizer):
    encoder = make_encoder("vicuna_v1", system="", image_tokens=3)
    encoded = encoder.encode(chat((Q1, A1), (Q2, A2)), num_images=1)
    prompt1 = ["<s>", "USER", ":", IMAGE, IMAGE, IMAGE, "What", "colour", "is", "the", "square", "?", "ASSISTANT", ":"]
    answer1 = ["It", "is", "red", ".", "</s>"]
    prompt2 = ["USER", ":", "How", "many", "objects", "are", "there", "?", "ASSISTANT", ":"]
    answer2 = ["There", "are", "two", ".", "</s>"]
    assert tokens(tokenizer, encoded.input_ids) == prompt1 + answer1 + prompt2 + answer2
    mask = [False] * len(prompt1) + [True] * len(answer1) + [False] * len(prompt2) + [True] * len(answer2)
    assert [label != IGNORE_INDEX for label in encoded.labels] == mask
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(encoded.labels, encoded.input_ids, strict=True))
    assert encoded.num_images == 1


def test_vicuna_multi_turn_supervises_only_answers_and_their_eos(make_encoder, tokenizer):
    encoder = make_encoder("vicuna_v1", system=None)
    encoded = encoder.encode(chat((Q1, A1), (Q2, A2), (Q3, A3)), num_images=1)
    assert len(encoded.input_ids) == len(encoded.labels)
    assert tokenizer.unk_token_id not in encoded.input_ids
    runs = supervised_runs(encoded)
    assert [tokenizer.decode(run) for run in runs] == [
        "It is red . </s>",
        "There are two . </s>",
        "It is a circle . </s>",
    ]
    for run, answer in zip(runs, (A1, A2, A3), strict=True):
        assert run == tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    # everything else, the default system prompt included, is context only
    unsupervised = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label == IGNORE_INDEX]
    system_ids = tokenizer(VicunaTemplate.DEFAULT_SYSTEM, add_special_tokens=False)["input_ids"]
    assert encoded.input_ids[1 : 1 + len(system_ids)] == system_ids
    assert unsupervised[: 1 + len(system_ids)] == [tokenizer.bos_token_id] + system_ids
    assert unsupervised.count(encoder.image_token_id) == 16
    assert tokenizer.eos_token_id not in unsupervised


def test_plain_template_supervises_the_caption(make_encoder, tokenizer):
    encoder = make_encoder("plain", image_tokens=4)
    encoded = encoder.encode(chat(("<image>\nWhat colour is the square?", "A red circle.")), num_images=1)
    # no eos, as LLaVA's stage 1 (the word-level demo tokenizer drops the caption's newline)
    assert tokens(tokenizer, encoded.input_ids) == ["<s>"] + [IMAGE] * 4 + ["A", "red", "circle", "."]
    assert encoded.labels == [IGNORE_INDEX] * 5 + encoded.input_ids[5:]


@pytest.mark.parametrize("image_tokens", [1, 16, 24])
def test_image_tag_expands_to_image_tokens_placeholders(make_encoder, image_tokens):
    encoder = make_encoder(image_tokens=image_tokens)
    image_id = encoder.image_token_id
    encoded = encoder.encode(chat(("<image>\n<image>\nWhat colour is the square?", A1)), num_images=2)
    assert encoded.input_ids.count(image_id) == 2 * image_tokens
    first = encoded.input_ids.index(image_id)
    assert encoded.input_ids[first : first + 2 * image_tokens] == [image_id] * (2 * image_tokens)
    assert all(encoded.labels[i] == IGNORE_INDEX for i, t in enumerate(encoded.input_ids) if t == image_id)


@pytest.mark.parametrize(("human", "num_images"), [(Q1, 0), (Q1, 2), ("<image><image> " + Q2, 1), (Q2, 1)])
def test_tag_and_image_count_must_agree(make_encoder, human, num_images):
    tags = human.count(IMAGE)
    with pytest.raises(SampleError) as info:
        make_encoder().encode(chat((human, A1)), num_images=num_images)
    assert info.value.reason == "image_tag_mismatch"
    assert str(info.value) == f"image_tag_mismatch: {tags} <image> tags but {num_images} images"


def test_empty_conversation_is_a_sample_error(make_encoder):
    with pytest.raises(SampleError) as info:
        make_encoder().encode([], num_images=0)
    assert info.value.reason == "empty_conversation"


def test_truncation_drops_whole_trailing_turns(make_encoder):
    turns = [(Q1, A1), (Q2, A2), (Q3, A3)]
    full = [make_encoder().encode(chat(*turns[:n]), num_images=1) for n in (1, 2, 3)]
    lengths = [len(e.input_ids) for e in full]
    assert lengths[0] < lengths[1] < lengths[2]
    for max_length, kept in [
        (lengths[2], 3),
        (lengths[2] - 1, 2),  # the third turn loses one token: it goes entirely
        (lengths[1], 2),
        (lengths[1] - 1, 1),
        (lengths[0], 1),
    ]:
        encoded = make_encoder(max_length=max_length).encode(chat(*turns), num_images=1)
        assert encoded.input_ids == full[kept - 1].input_ids, max_length
        assert encoded.labels == full[kept - 1].labels, max_length
        assert len(encoded.input_ids) <= max_length


def test_first_turn_too_long_is_a_sample_error(make_encoder):
    first = make_encoder().encode(chat((Q1, A1)), num_images=1)
    with pytest.raises(SampleError) as info:
        make_encoder(max_length=len(first.input_ids) - 1).encode(chat((Q1, A1), (Q2, A2)), num_images=1)
    assert info.value.reason == "too_long"
    assert "first turn alone exceeds max_length=" in str(info.value)


def test_truncation_that_would_drop_an_image_is_too_long(make_encoder):
    turns = [(Q2, A2), (Q1, A1)]  # the image is in the second turn
    first = make_encoder().encode(chat(turns[0]), num_images=0)
    with pytest.raises(SampleError) as info:
        make_encoder(max_length=len(first.input_ids)).encode(chat(*turns), num_images=1)
    assert info.value.reason == "too_long"
    assert "would drop an image" in str(info.value)


class _FakeTokenizer:
    unk_token_id = 1
    bos_token_id = None
    is_fast = True

    def __init__(self, eos_token_id, image_id):
        self.eos_token_id = eos_token_id
        self.image_id = image_id

    def convert_tokens_to_ids(self, token):
        return self.image_id


def test_encoder_needs_an_image_token_and_eos():
    with pytest.raises(ValueError, match="the tokenizer has no <image> token"):
        ConversationEncoder(_FakeTokenizer(eos_token_id=2, image_id=1), PlainTemplate(), image_tokens=4)
    with pytest.raises(ValueError, match="the tokenizer has no <image> token"):
        ConversationEncoder(_FakeTokenizer(eos_token_id=2, image_id=None), PlainTemplate(), image_tokens=4)
    with pytest.raises(ValueError, match="the tokenizer has no eos token"):
        ConversationEncoder(_FakeTokenizer(eos_token_id=None, image_id=5), _EndsWithEos(), image_tokens=4)


class _EndsWithEos(PlainTemplate):
    appends_end_token = True


class _SlowTokenizer(_FakeTokenizer):
    is_fast = False


def test_encoder_needs_offsets():
    with pytest.raises(ValueError) as info:
        ConversationEncoder(_SlowTokenizer(eos_token_id=2, image_id=5), PlainTemplate(), image_tokens=4)
    assert str(info.value) == (
        "the tokenizer _SlowTokenizer gives no character offsets, which label masks need; "
        "load a tokenizers-backed one (AutoTokenizer does by default)"
    )


# --- Llama-2 and the tokenizer's own chat template, on a byte-level tokenizer -------------
#
# Token id == byte value (plus fixed ids for the special tokens), so references are built
# from hand-written text without the tokenizer, and decoding gives the text back exactly.

SPECIALS = [
    "<image>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
SPECIAL_IDS = {token: 256 + i for i, token in enumerate(SPECIALS)}
IMAGE_ID = SPECIAL_IDS[IMAGE]
LLAVA_LLAMA2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)

# Modelled on Qwen2-Instruct's template: a default system message when none is given.
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Modelled on Meta-Llama-3-Instruct's template: it writes bos itself and trims contents.
LLAMA3 = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Modelled on Llama-2-chat's template: bos and eos around every round, <<SYS>> in the first.
LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
# A template whose replies have no end marker: the encoder must end them with eos.
NO_END_MARKER = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character map, as the ByteLevel pre-tokenizer writes bytes."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, shifted = [], 0
    for byte in range(256):
        chars.append(chr(byte) if byte in printable else chr(256 + shifted))
        shifted += byte not in printable
    return chars


def byte_tokenizer(
    chat_template: str | None = None,
    bos: str | None = "<s>",
    eos: str = "</s>",
    adds_bos: bool = False,
    specials: list[str] = SPECIALS,
    name: str = "tiny",
):
    """A byte-level tokenizer without merges; `adds_bos` makes `tokenizer(text)` prepend bos, as Llama's do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in enumerate(_byte_chars())} | {t: SPECIAL_IDS[t] for t in specials}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos)
    tokenizer.chat_template = chat_template
    tokenizer.name_or_path = name
    return tokenizer


def byte_ids(text: str, image_tokens: list[int]) -> list[int]:
    """The reference tokenization: special tokens by their fixed ids, everything else byte by byte,
    each `<image>` as the next count of image placeholders."""
    ids: list[int] = []
    for piece in re.split("(" + "|".join(map(re.escape, SPECIALS)) + ")", text):
        if piece == IMAGE:
            ids += [IMAGE_ID] * image_tokens.pop(0)
        else:
            ids += [SPECIAL_IDS[piece]] if piece in SPECIAL_IDS else list(piece.encode())
    return ids


def reference(segments: list[tuple[str, bool]], image_tokens: list[int]) -> tuple[list[int], list[int]]:
    """Input ids and labels from hand-written (text, supervised) pieces."""
    counts = list(image_tokens)
    input_ids, labels = [], []
    for text, supervised in segments:
        ids = byte_ids(text, counts)
        input_ids += ids
        labels += ids if supervised else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def byte_encoder(template: str, system: str | None = None, tokenizer=None, max_length: int = 4096, **options):
    tokenizer = tokenizer or byte_tokenizer(**options)
    return ConversationEncoder(
        tokenizer, build_template(template, system, tokenizer=tokenizer), image_tokens=3, max_length=max_length
    )


THREE_TURNS = chat((Q1, A1), (Q2, A2), (Q3, A3))
QUESTIONS = [(Q1, A1), (Q2, A2), (Q3, A3)]

MULTI_TURN_CASES = {
    # plain keeps the first answer only (stage 1 has one caption per image)
    "plain": (
        dict(template="plain"),
        [("<s>", False), (IMAGE, False), (f"{A1}\n", True)],
        f"{A1}\n",
    ),
    "vicuna_v1": (
        dict(template="vicuna_v1"),
        [("<s>", False), (f"{VicunaTemplate.DEFAULT_SYSTEM} USER: {Q1} ASSISTANT:", False), (f" {A1}</s>", True)]
        + [(f"USER: {Q2} ASSISTANT:", False), (f" {A2}</s>", True)]
        + [(f"USER: {Q3} ASSISTANT:", False), (f" {A3}</s>", True)],
        f" {A1}</s> {A2}</s> {A3}</s>",
    ),
    "llama2": (
        dict(template="llama2"),
        [
            ("<s>", False),
            (f"[INST] <<SYS>>\n{LLAVA_LLAMA2_SYSTEM}\n<</SYS>>\n\n{Q1} [/INST]", False),
            (f" {A1} </s>", True),
        ]
        + [(f"<s>[INST] {Q2} [/INST]", False), (f" {A2} </s>", True)]
        + [(f"<s>[INST] {Q3} [/INST]", False), (f" {A3} </s>", True)],
        f" {A1} </s> {A2} </s> {A3} </s>",
    ),
    "chatml": (
        dict(template="chat_template", chat_template=CHATML, bos=None, eos="<|im_end|>"),
        [
            ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", False),
            (f"<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n", False),
            (f"{A1}<|im_end|>", True),
            ("\n", False),
            (f"<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n", False),
            (f"{A2}<|im_end|>", True),
            ("\n", False),
            (f"<|im_start|>user\n{Q3}<|im_end|>\n<|im_start|>assistant\n", False),
            (f"{A3}<|im_end|>", True),
            ("\n", False),
        ],
        f"{A1}<|im_end|>{A2}<|im_end|>{A3}<|im_end|>",
    ),
    "llama3": (
        dict(template="chat_template", chat_template=LLAMA3, bos="<|begin_of_text|>", eos="<|eot_id|>", adds_bos=True),
        [
            ("<|begin_of_text|>", False),
            (f"<|start_header_id|>user<|end_header_id|>\n\n{Q1}<|eot_id|>", False),
            ("<|start_header_id|>assistant<|end_header_id|>\n\n", False),
            (f"{A1}<|eot_id|>", True),
            (f"<|start_header_id|>user<|end_header_id|>\n\n{Q2}<|eot_id|>", False),
            ("<|start_header_id|>assistant<|end_header_id|>\n\n", False),
            (f"{A2}<|eot_id|>", True),
            (f"<|start_header_id|>user<|end_header_id|>\n\n{Q3}<|eot_id|>", False),
            ("<|start_header_id|>assistant<|end_header_id|>\n\n", False),
            (f"{A3}<|eot_id|>", True),
        ],
        f"{A1}<|eot_id|>{A2}<|eot_id|>{A3}<|eot_id|>",
    ),
}


@pytest.mark.parametrize("case", list(MULTI_TURN_CASES))
def test_three_turn_labels_match_a_hand_built_reference(case):
    options, segments, replies = MULTI_TURN_CASES[case]
    encoder = byte_encoder(**options)
    encoded = encoder.encode(THREE_TURNS, num_images=1)
    assert (encoded.input_ids, encoded.labels) == reference(segments, [3])
    supervised = [label for label in encoded.labels if label != IGNORE_INDEX]
    assert encoder.tokenizer.decode(supervised) == replies


def test_llama2_render_is_llavas_format():
    """LLaVA's text: the first `<s>` is the tokenizer's bos, later rounds write it; replies as written."""
    segments = Llama2Template().render([(Q1, f" {A1}\n"), (Q2, A2)])
    assert "".join(text for turn in segments for text, _ in turn) == (
        f"[INST] <<SYS>>\n{LLAVA_LLAMA2_SYSTEM}\n<</SYS>>\n\n{Q1} [/INST]  {A1}\n </s><s>[INST] {Q2} [/INST] {A2} </s>"
    )
    assert Llama2Template.DEFAULT_SYSTEM == LLAVA_LLAMA2_SYSTEM
    assert Llama2Template("").render([(Q2, A2)]) == [[(f"[INST] {Q2} [/INST]", False), (f" {A2} </s>", True)]]
    assert Llama2Template("Be brief.").render([(Q2, A2)])[0][0] == (
        f"[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n{Q2} [/INST]",
        False,
    )


@pytest.mark.parametrize(
    ("llama2_system", "chat_system"), [(None, LLAVA_LLAMA2_SYSTEM), ("", None), ("Be brief.", "Be brief.")]
)
def test_llama2_encodes_as_llama2_chats_own_template(llama2_system, chat_system):
    """Our llama2 and the Llama-2-chat Jinja template give the same ids and labels."""
    ours = byte_encoder("llama2", llama2_system).encode(THREE_TURNS, num_images=1)
    jinja = byte_encoder("chat_template", chat_system, chat_template=LLAMA2_CHAT).encode(THREE_TURNS, num_images=1)
    assert (ours.input_ids, ours.labels) == (jinja.input_ids, jinja.labels)
    assert ours.input_ids.count(SPECIAL_IDS["<s>"]) == 3 and ours.input_ids[0] == SPECIAL_IDS["<s>"]


def test_llama2_needs_its_control_tokens():
    tokenizer = byte_tokenizer(bos=None, eos="<|im_end|>", specials=[IMAGE, "<|im_end|>"])
    with pytest.raises(ValueError) as info:
        ConversationEncoder(tokenizer, build_template("llama2"), image_tokens=3)
    assert str(info.value) == "the template writes '<s>', which the tokenizer does not read as one token"


@pytest.mark.parametrize(
    ("system", "first_prompt"),
    [
        (None, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"),  # the template's own default
        ("Be brief.", "<|im_start|>system\nBe brief.<|im_end|>\n"),
        ("", "<|im_start|>system\n<|im_end|>\n"),  # an empty system message, not the template's default
    ],
)
def test_chat_template_system_prompt(system, first_prompt):
    template = build_template("chat_template", system, tokenizer=byte_tokenizer(CHATML))
    assert template.render([(Q2, A2)]) == [
        [(f"{first_prompt}<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n", False)]
        + [(f"{A2}<|im_end|>", True), ("\n", False)]
    ]


@pytest.mark.parametrize(
    ("options", "adds_bos", "appends_end_token"),
    [
        (dict(chat_template=CHATML, bos=None, eos="<|im_end|>"), False, False),  # Qwen: no bos at all
        (dict(chat_template=CHATML, adds_bos=True), True, False),  # the template omits the bos the tokenizer adds
        (dict(chat_template=CHATML), False, False),  # a bos the tokenizer does not add itself stays out
        (dict(chat_template=LLAMA3, bos="<|begin_of_text|>", eos="<|eot_id|>", adds_bos=True), False, False),
        (dict(chat_template=LLAMA2_CHAT, adds_bos=True), False, False),
        (dict(chat_template=NO_END_MARKER), False, True),
    ],
)
def test_chat_template_adds_only_the_special_tokens_its_text_lacks(options, adds_bos, appends_end_token):
    template = build_template("chat_template", tokenizer=byte_tokenizer(**options))
    assert (template.adds_bos, template.appends_end_token) == (adds_bos, appends_end_token)


def test_builtin_templates_special_token_duties():
    """LLaVA's templates: the tokenizer's bos, `</s>` written in the text (none for plain), and each
    chunk between image tags tokenized on its own, as `tokenizer_image_token` does."""
    for template in (PlainTemplate, VicunaTemplate, Llama2Template):
        assert (template.adds_bos, template.appends_end_token, template.tokenizes_images_apart) == (True, False, True)
    assert ChatTemplate.tokenizes_images_apart is False


def test_chat_template_without_bos_in_its_text_gets_the_tokenizers_bos():
    encoder = byte_encoder("chat_template", chat_template=CHATML, adds_bos=True)
    encoded = encoder.encode(chat((Q2, A2)), num_images=0)
    segments = [
        ("<s><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", False),
        (f"<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n", False),
        (f"{A2}<|im_end|>", True),
        ("\n", False),
    ]
    assert (encoded.input_ids, encoded.labels) == reference(segments, [])


def test_chat_template_without_end_marker_ends_replies_with_eos():
    encoder = byte_encoder("chat_template", chat_template=NO_END_MARKER, bos=None)
    encoded = encoder.encode(chat((Q2, A2), (Q3, A3)), num_images=0)
    segments = [
        (f"user: {Q2}\nassistant:", False),
        (f" {A2}</s>", True),
        ("\n", False),
        (f"user: {Q3}\nassistant:", False),
        (f" {A3}</s>", True),
        ("\n", False),
    ]
    assert (encoded.input_ids, encoded.labels) == reference(segments, [])


@pytest.mark.parametrize("chat_template", [CHATML, LLAMA3])
def test_chat_template_expands_image_tags_in_any_turn(chat_template):
    encoder = byte_encoder("chat_template", chat_template=chat_template, bos="<|begin_of_text|>")
    q3 = f"{IMAGE} {IMAGE}\n{Q3}"
    encoded = encoder.encode(chat((Q1, A1), (Q2, A2), (q3, A3)), num_images=3, image_tokens=[2, 4, 5])
    assert encoded.input_ids.count(IMAGE_ID) == 11
    start = encoded.input_ids.index(IMAGE_ID)
    assert encoded.input_ids[start : start + 2] == [IMAGE_ID] * 2
    assert encoded.input_ids[start + 2] != IMAGE_ID
    later = encoded.input_ids.index(IMAGE_ID, start + 2)
    assert encoded.input_ids[later : later + 10] == [IMAGE_ID] * 4 + list(b" ") + [IMAGE_ID] * 5
    assert all(
        label == IGNORE_INDEX for label, t in zip(encoded.labels, encoded.input_ids, strict=True) if t == IMAGE_ID
    )
    text = encoder.tokenizer.decode(encoded.input_ids)
    assert f"{IMAGE * 4} {IMAGE * 5}\n{Q3}" in text


def test_chat_template_truncates_whole_turns():
    full = [
        byte_encoder("chat_template", chat_template=CHATML).encode(chat(*QUESTIONS[:n]), num_images=1) for n in (1, 2)
    ]
    for max_length, kept in [(len(full[1].input_ids), 2), (len(full[1].input_ids) - 1, 1)]:
        encoded = byte_encoder("chat_template", chat_template=CHATML, max_length=max_length).encode(THREE_TURNS, 1)
        assert (encoded.input_ids, encoded.labels) == (full[kept - 1].input_ids, full[kept - 1].labels)


def test_chat_template_needs_a_tokenizer_with_a_chat_template():
    with pytest.raises(ValueError) as info:
        build_template("chat_template")
    assert str(info.value) == "the chat_template template renders with a tokenizer; pass build_template(tokenizer=...)"
    with pytest.raises(ValueError) as info:
        build_template("chat_template", tokenizer=byte_tokenizer(name="tiny-base"))
    assert str(info.value) == (
        "tokenizer 'tiny-base' has no chat_template, so the chat_template template cannot render; "
        "choose another data.template (llama2, plain, vicuna_v1)"
    )
    assert isinstance(build_template("chat_template", tokenizer=byte_tokenizer(CHATML)), ChatTemplate)


# Appends a marker only when the chat is complete, so a prompt never extends the chat before it.
CLOSES_THE_CHAT = CHATML + "{% if not add_generation_prompt %}{{ '<|endoftext|>' }}{% endif %}"
# Modelled on Qwen3's: earlier replies lose their reasoning once the chat goes on.
DROPS_REASONING = (
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and not loop.last %}"
    "{% set content = content.split('</think>')[-1] | trim %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
OPENS_A_THINK_BLOCK = CHATML.replace(
    "'<|im_start|>assistant\\n' }}{% endif %}", "'<|im_start|>assistant\\n<think>' }}{% endif %}"
)
DROPS_IMAGE_TAGS = CHATML.replace("message['content']", "message['content'] | replace('<image>', '')")


@pytest.mark.parametrize(
    ("chat_template", "why"),
    [
        (CLOSES_THE_CHAT, "rewrites earlier turns as the chat grows"),
        (OPENS_A_THINK_BLOCK, "renders a reply without the generation prompt it asks for"),
    ],
)
def test_chat_template_that_breaks_prefixes_fails_at_construction(chat_template, why):
    with pytest.raises(ValueError) as info:
        build_template("chat_template", tokenizer=byte_tokenizer(chat_template, name="tiny-odd"))
    assert str(info.value) == f"the chat template of 'tiny-odd' {why}, so replies cannot be masked by prefix"


@pytest.mark.parametrize(
    ("chat_template", "messages", "why"),
    [
        (
            DROPS_REASONING,
            chat((Q2, f"<think>count</think> {A2}"), (Q3, A3)),
            "rewrites earlier turns as the chat grows",
        ),
        (DROPS_IMAGE_TAGS, chat((Q1, A1)), "does not pass <image> tags through unchanged"),
    ],
)
def test_chat_template_that_breaks_a_sample_is_refused(chat_template, messages, why):
    encoder = byte_encoder("chat_template", chat_template=chat_template, name="tiny-odd")
    assert encoder.encode(chat((Q2, A2), (Q3, A3)), num_images=0).input_ids  # plain chats are fine
    with pytest.raises(ValueError) as info:
        encoder.encode(messages, num_images=messages[0]["value"].count(IMAGE))
    assert str(info.value) == f"the chat template of 'tiny-odd' {why}, so replies cannot be masked by prefix"


# ---- prompts for generation (predict, chat): the training sequence up to the last reply


def last_reply_start(labels: list[int]) -> int:
    """Where the last supervised run of a training sequence begins (the last reply)."""
    start = len(labels)
    while start > 0 and labels[start - 1] == IGNORE_INDEX:
        start -= 1
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


@pytest.mark.parametrize("case", list(MULTI_TURN_CASES))
def test_the_prompt_is_the_training_sequence_up_to_the_last_reply(case):
    """Every template (plain, vicuna_v1, llama2, ChatML, Llama-3): generation starts where training
    supervised the reply, after the template's generation prompt."""
    options, _, _ = MULTI_TURN_CASES[case]
    encoder = byte_encoder(**options)
    full = encoder.encode(THREE_TURNS, num_images=1)
    prompt = encoder.encode_prompt(THREE_TURNS[:-1], num_images=1)
    assert prompt.input_ids == full.input_ids[: last_reply_start(full.labels)]
    assert set(prompt.labels) == {IGNORE_INDEX}


def test_prompt_errors_are_sample_errors():
    encoder = byte_encoder(template="vicuna_v1", max_length=40)
    with pytest.raises(SampleError, match="a prompt must end with a human turn"):
        encoder.encode_prompt(THREE_TURNS, num_images=1)
    with pytest.raises(SampleError, match="image_tag_mismatch"):
        encoder.encode_prompt(THREE_TURNS[:1], num_images=0)
    with pytest.raises(SampleError, match="too_long: the prompt has"):
        encoder.encode_prompt(THREE_TURNS[:-1], num_images=1)


# ---- chat_template: the text and ids of apply_chat_template, the assistant turns supervised

# Qwen2.5-Instruct's template (its tool-calling branches left out): a default system message.
QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHAT_TEMPLATE_CASES = {
    "qwen2.5": dict(chat_template=QWEN25, bos=None, eos="<|im_end|>", end="<|im_end|>"),
    "llama3": dict(chat_template=LLAMA3, bos="<|begin_of_text|>", eos="<|eot_id|>", adds_bos=True, end="<|eot_id|>"),
}
CHAT_TEMPLATE_CHATS = [
    chat((Q1, A1)),
    chat((Q1, A1), (Q2, A2), (Q3, A3)),
    chat(("What is shown?\n<image>", "  A cat.  "), ("And here <image>?", "A dog.\nIt sleeps.")),
    chat(("Say ASSISTANT: and <|im_start|>user please.", "ASSISTANT: <|im_start|>user")),
]


@pytest.mark.parametrize("system", [None, "", "Be brief."])
@pytest.mark.parametrize("case", list(CHAT_TEMPLATE_CASES))
@pytest.mark.parametrize("messages", CHAT_TEMPLATE_CHATS, ids=range(len(CHAT_TEMPLATE_CHATS)))
def test_chat_template_equals_apply_chat_template(case, system, messages):
    """Text and ids are `tokenizer.apply_chat_template`'s for the same messages (each <image> tag
    expanded), and exactly the assistant turns, end marker included, are supervised."""
    options = dict(CHAT_TEMPLATE_CASES[case])
    end = options.pop("end")
    encoder = byte_encoder("chat_template", system, **options)
    tokenizer = encoder.tokenizer
    roles = {"human": "user", "gpt": "assistant"}
    hf_messages = ([] if system is None else [{"role": "system", "content": system}]) + [
        {"role": roles[m["from"]], "content": m["value"]} for m in messages
    ]
    text = tokenizer.apply_chat_template(hf_messages, tokenize=False)
    rendered = encoder.template.render(to_turns(messages))
    assert "".join(segment for turn in rendered for segment, _ in turn) == text
    num_images = sum(m["value"].count(IMAGE) for m in messages)
    encoded = encoder.encode(messages, num_images=num_images)
    hf_ids = tokenizer.apply_chat_template(hf_messages, tokenize=True, return_dict=True)["input_ids"]
    expanded = [i for t in hf_ids for i in ([IMAGE_ID] * 3 if t == IMAGE_ID else [t])]
    assert encoded.input_ids == expanded
    replies = [m["value"] for m in messages if m["from"] == "gpt"]
    if case == "llama3":
        replies = [reply.strip() for reply in replies]  # Llama-3's template trims contents
    assert [tokenizer.decode(run) for run in supervised_runs(encoded)] == [reply + end for reply in replies]
