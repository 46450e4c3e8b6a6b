"""src.data.conversation: templates, image-tag expansion, label masks and truncation."""

from __future__ import annotations

import re

import pytest

from src.data.conversation import (
    IGNORE_INDEX,
    MC_FORMATS,
    MC_INSTRUCTION,
    ConversationEncoder,
    PlainTemplate,
    SampleError,
    VicunaTemplate,
    build_template,
    multiple_choice_answer,
    multiple_choice_prompt,
    parse_choice,
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
    # an option's text is not a letter: read back, it names no option
    assert parse_choice(multiple_choice_answer(options, 1, "option"), 3) is None


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("B", 1),
        ("B.", 1),
        ("  C", 2),
        ("B. red", 1),  # LLaVA's "X. option" reply
        ("D.\n", 3),
        ("red. The answer is C.", 2),  # "The answer is" wins over the leading word
        ("green. The answer is C.", 2),
        ("The answer is (A)", 0),
        ("It is green, so The answer is D", 3),
        ("B. red. The answer is C.", 2),  # one "The answer is": it decides, not the leading letter
        ("The answer is A. The answer is B.", None),  # two answers: none
        ("The answer is A. The answer is A.", None),  # even when they agree
        ("A circle.", None),  # "A" as an article is not choice A
        ("A red", None),
        ("B red", None),  # a letter must stand alone or be followed by "."
        ("(C) green", None),
        ("  D: blue", None),
        ("Because it is green.", None),  # a word that starts with a letter is not a letter
        ("green", None),
        ("", None),
        ("b", None),  # lower case is not an option letter
        ("E", None),  # beyond the 4 options
        ("E. purple", None),
        ("blue. The answer is F.", None),
    ],
)
def test_parse_choice(reply, expected):
    assert parse_choice(reply, 4) == expected


def test_parse_choice_reads_back_every_reasoned_answer():
    options = ["red", "green", "blue", "yellow", "purple", "circle", "square", "triangle"]
    for n in range(2, 9):
        for answer in range(n):
            assert parse_choice(multiple_choice_answer(options[:n], answer, "reasoned"), n) == answer
            assert parse_choice(multiple_choice_answer(options[:n], answer, "letter"), n) == answer


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
        (None, "empty_conversation"),
        ("hello", "empty_conversation"),
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


@pytest.mark.parametrize(
    ("reply", "n", "expected"),
    [("H", 8, 7), ("H", 7, None), ("C", 3, 2), ("C.", 2, None), ("The answer is D.", 3, None), ("B", 2, 1)],
)
def test_parse_choice_letter_beyond_the_options_is_no_answer(reply, n, expected):
    assert parse_choice(reply, n) == expected


def test_build_template():
    assert isinstance(build_template("plain"), PlainTemplate)
    assert build_template("vicuna_v1").system == VicunaTemplate.DEFAULT_SYSTEM
    assert build_template("vicuna_v1", "").system == ""
    assert build_template("vicuna_v1", "Be brief.").system == "Be brief."
    with pytest.raises(ValueError, match="unknown conversation template 'Plain'"):
        build_template("Plain")


def test_vicuna_render_segments():
    segments = VicunaTemplate("SYS").render([(Q1, " " + A1 + " "), (Q2, A2)])
    assert segments == [
        [(f"SYS USER: {Q1} ASSISTANT:", False), (f" {A1}", True)],
        [(f"USER: {Q2} ASSISTANT:", False), (f" {A2}", True)],
    ]


def test_plain_render_keeps_only_tags_and_first_answer():
    segments = PlainTemplate().render([("Look: <image> and <image> please", " A caption. "), (Q2, A2)])
    assert segments == [[("<image><image>", False), ("A caption.", True)]]


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
    assert tokens(tokenizer, encoded.input_ids) == ["<s>"] + [IMAGE] * 4 + ["A", "red", "circle", ".", "</s>"]
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
        ConversationEncoder(_FakeTokenizer(eos_token_id=None, image_id=5), PlainTemplate(), image_tokens=4)
