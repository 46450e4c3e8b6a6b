"""Prompts rendered for a known input, and the parser/validator's verdicts."""

from __future__ import annotations

import json

import pytest

from src.instruct.parse import Rejected, to_conversation, validate
from src.instruct.prompts import (
    KINDS,
    KindSpec,
    build_messages,
    format_box,
    load_kind,
    pick_question,
    render_context,
    unwrap,
)
from src.instruct.sources import Box, CocoSource, Item


@pytest.fixture
def coco(tmp_path, jpeg_bytes):
    """One 640x480 COCO image with two captions and two boxes (pixels, [x, y, w, h])."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "000000000042.jpg").write_bytes(jpeg_bytes())
    images = [{"id": 42, "file_name": "000000000042.jpg", "width": 640, "height": 480}]
    captions = {
        "images": images,
        "annotations": [
            {"id": 1, "image_id": 42, "caption": "A dog  catches a frisbee in a park.\n"},
            {"id": 2, "image_id": 42, "caption": "A brown dog jumping on the grass."},
        ],
    }
    instances = {
        "images": images,
        "categories": [{"id": 18, "name": "dog"}, {"id": 34, "name": "frisbee"}],
        "annotations": [
            {"id": 7, "image_id": 42, "category_id": 18, "bbox": [64, 48, 256, 192]},
            {"id": 8, "image_id": 42, "category_id": 34, "bbox": [400.5, 10, 300, 33.3]},  # runs off the right edge
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    return CocoSource(tmp_path / "captions.json", tmp_path / "instances.json", tmp_path / "images")


def test_coco_boxes_are_normalised_and_rendered_with_fixed_decimals(coco):
    [item] = list(coco)
    assert item.id == "42" and item.image == "000000000042.jpg"
    assert item.captions == ["A dog catches a frisbee in a park.", "A brown dog jumping on the grass."]
    # 64/640, 48/480, (64+256)/640, (48+192)/480; the frisbee is clamped at the right edge
    assert render_context(item, use_boxes=True, decimals=3) == (
        "A dog catches a frisbee in a park.\n"
        "A brown dog jumping on the grass.\n"
        "\n"
        "dog: [0.100, 0.100, 0.500, 0.500]\n"
        "frisbee: [0.626, 0.021, 1.000, 0.090]"
    )
    assert render_context(item, use_boxes=True, decimals=2).endswith("frisbee: [0.63, 0.02, 1.00, 0.09]")
    assert (
        render_context(item, use_boxes=False) == "A dog catches a frisbee in a park.\nA brown dog jumping on the grass."
    )


def test_messages_are_system_then_examples_then_the_image(coco):
    [item] = list(coco)
    for kind in KINDS:
        spec = load_kind(kind)
        messages = build_messages(spec, item)
        assert messages[0] == {"role": "system", "content": spec.system}
        assert [m["role"] for m in messages[1:-1]] == ["user", "assistant"] * len(spec.examples)
        assert len(spec.examples) >= 2
        assert messages[1]["content"] == spec.examples[0][0] and messages[2]["content"] == spec.examples[0][1]
        assert messages[-1] == {"role": "user", "content": render_context(item, spec.use_boxes)}
    # the paper shows the conversation teacher captions only, the other two boxes as well
    assert "dog: [0.100" not in build_messages(load_kind("conversation"), item)[-1]["content"]
    assert "dog: [0.100, 0.100, 0.500, 0.500]" in build_messages(load_kind("detail"), item)[-1]["content"]


def test_system_messages_say_what_the_paper_asks():
    for kind in KINDS:
        system = load_kind(kind).system.lower()
        assert "never mention" in system and "captions" in system and "coordinates" in system
    assert "definite answer" in load_kind("conversation").system
    assert "reasoning" in load_kind("complex_reasoning").system


def test_the_few_shot_examples_pass_our_own_validation():
    for kind in KINDS:
        spec = load_kind(kind)
        for index, (context, response) in enumerate(spec.examples):
            validate(to_conversation(spec, f"example{index}", response), spec)
            if spec.use_boxes:  # the examples show boxes as the renderer writes them
                assert any(line.count(",") == 3 and ": [0." in line for line in context.splitlines())


def test_example_responses_are_unwrapped_paragraphs():
    assert unwrap("Question:\nWhat is\n  it?\n===\nAnswer:\nA dog\nin a park.\n\nIt runs.") == (
        "Question:\nWhat is it?\n===\nAnswer:\nA dog in a park.\n\nIt runs."
    )
    [first, second] = load_kind("detail").examples[0][1].split("\n\n")
    assert "\n" not in first and "\n" not in second and first.startswith("The image shows a city street")
    conversation = load_kind("conversation").examples[0][1]
    assert (
        "Answer:\nWet roads make braking distances longer and surfaces such as painted lines and metal covers slippery,"
        in conversation
    )


def test_format_box():
    assert (
        format_box(Box("traffic light", 0.6521, 0.0974, 0.689, 0.2283)) == "traffic light: [0.652, 0.097, 0.689, 0.228]"
    )
    assert format_box(Box("cat", 0, 0.5, 1, 1), decimals=2) == "cat: [0.00, 0.50, 1.00, 1.00]"


def test_unknown_kind_and_bad_prompt_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown kind 'story'"):
        load_kind("story")
    with pytest.raises(FileNotFoundError, match="no prompt file"):
        load_kind("detail", tmp_path)
    (tmp_path / "detail.yaml").write_text("system: hello\n")
    with pytest.raises(ValueError, match="needs a list of questions"):
        load_kind("detail", tmp_path)


# ------------------------------------------------------------------ parsing and validation

CONVERSATION = load_kind("conversation")
DETAIL = load_kind("detail")
COMPLEX = load_kind("complex_reasoning")
GOOD = (
    "Question:\nWhat is the dog doing?\n===\nAnswer:\nThe dog is leaping to catch a frisbee.\n===\n"
    "Question:\nWhere is this happening?\n===\nAnswer:\nIn a grassy park on a sunny day, with trees behind."
)


def test_a_reply_becomes_a_llava_conversation():
    assert to_conversation(CONVERSATION, "1", GOOD) == [
        {"from": "human", "value": "<image>\nWhat is the dog doing?"},
        {"from": "gpt", "value": "The dog is leaping to catch a frisbee."},
        {"from": "human", "value": "Where is this happening?"},
        {"from": "gpt", "value": "In a grassy park on a sunny day, with trees behind."},
    ]
    validate(to_conversation(CONVERSATION, "1", GOOD), CONVERSATION)
    # labels on the same line, bold markdown labels and no separators parse the same
    loose = GOOD.replace("===\n", "").replace("Question:\n", "**Question:** ").replace("Answer:\n", "Answer: ")
    assert to_conversation(CONVERSATION, "1", loose) == to_conversation(CONVERSATION, "1", GOOD)


def test_a_detail_reply_answers_a_question_from_the_list():
    text = "A brown dog leaps across a sunny park to catch a red frisbee. " * 5
    conversation = to_conversation(DETAIL, "42", text)
    question = pick_question(DETAIL, "42")
    assert question in DETAIL.questions
    assert conversation == [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": text.strip()}]
    validate(conversation, DETAIL)
    assert pick_question(DETAIL, "42") == question  # stable across runs


def rejected(spec: KindSpec, conversation_or_text) -> str:
    with pytest.raises(Rejected) as caught:
        conversation = (
            to_conversation(spec, "1", conversation_or_text)
            if isinstance(conversation_or_text, str)
            else conversation_or_text
        )
        validate(conversation, spec)
    return caught.value.reason


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("As the caption says, the dog is leaping to catch a frisbee.", "leaked_caption"),
        ("Judging from the descriptions provided, it is a dog.", "leaked_caption"),
        ("The dog is at [0.10, 0.10, 0.50, 0.50] in the picture.", "leaked_coordinates"),
        ("The dog's box starts at 0.100 from the left side.", "leaked_coordinates"),
        ("The bounding box of the dog covers half of the view.", "leaked_coordinates"),
        ("Its coordinates put it near the middle of the view.", "leaked_coordinates"),
    ],
)
def test_leaks_are_rejected(answer, reason):
    assert rejected(CONVERSATION, GOOD.replace("The dog is leaping to catch a frisbee.", answer)) == reason


def test_ordinary_numbers_are_not_leaks():
    text = GOOD.replace("a sunny day", "a sunny day about 1.5 km from town, with 2 dogs and 0.5 litres of water")
    validate(to_conversation(CONVERSATION, "1", text), CONVERSATION)


def test_structure_and_length_are_checked():
    turns = to_conversation(CONVERSATION, "1", GOOD)
    assert rejected(CONVERSATION, "Sure, here you go: a dog in a park.") == "bad_format"
    assert rejected(CONVERSATION, "Here it is.\nQuestion:\nWhat?\n===\nAnswer:\nA dog.") == "bad_format"
    assert rejected(CONVERSATION, "Question:\nA?\n===\nQuestion:\nB?\n===\nAnswer:\nC.\n===\nAnswer:\nD.") == (
        "bad_alternation"
    )
    assert rejected(CONVERSATION, turns[:3]) == "bad_alternation"  # ends on a question
    assert rejected(CONVERSATION, [turns[1], turns[0], *turns[2:]]) == "bad_alternation"
    assert rejected(CONVERSATION, [dict(turns[0], value="<image>\n   "), *turns[1:]]) == "empty_turn"
    missing = [dict(turns[0], value="What is the dog doing?"), *turns[1:]]
    assert rejected(CONVERSATION, missing) == "image_tag"
    extra = [*turns[:3], dict(turns[3], value="It is in <image> a park, near trees.")]
    assert rejected(CONVERSATION, extra) == "image_tag"
    trailing = [dict(turns[0], value="What is the dog doing?\n<image>"), *turns[1:]]
    assert rejected(CONVERSATION, trailing) == "image_tag"
    assert rejected(CONVERSATION, turns[:2]) == "too_few_turns"
    assert rejected(COMPLEX, turns) == "too_many_turns"
    short = [turns[0], dict(turns[1], value="A dog."), turns[2], dict(turns[3], value="A park.")]
    assert rejected(CONVERSATION, short) == "too_short"
    long = [*turns[:3], dict(turns[3], value="In a park. " * 700)]
    assert rejected(CONVERSATION, long) == "too_long"
    assert rejected(DETAIL, GOOD) == "bad_format"  # a description was asked for
    assert rejected(DETAIL, "A dog.") == "too_short"


def test_items_render_without_boxes_when_there_are_none():
    item = Item("1", "a.jpg", ["A cat."])
    assert render_context(item, use_boxes=True) == "A cat."
