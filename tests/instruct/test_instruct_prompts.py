"""Prompts rendered for a known input (the kit's and LLaVA's layouts), the per-sample draws, and
the parser/validator's verdicts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fake_teacher import LLAVA_FILES, write_llava_prompts

from src.instruct.parse import Rejected, coordinate_leak, to_conversation, validate
from src.instruct.prompts import (
    KINDS,
    KindSpec,
    build_messages,
    format_box,
    load_kind,
    load_questions,
    render_context,
    shown_numbers,
    unwrap,
)
from src.instruct.sampling import image_first, pick_question
from src.instruct.sources import Box, CocoSource, Item

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def coco(tmp_path, jpeg_bytes):
    """One 500x375 COCO image with five captions (listed out of id order and interleaved with
    another image's), three boxes that render exactly and two with no area (pixels, [x, y, w, h])."""
    (tmp_path / "images").mkdir()
    for name in ("000000000042.jpg", "000000000043.jpg"):
        (tmp_path / "images" / name).write_bytes(jpeg_bytes())
    images = [
        {"id": 42, "file_name": "000000000042.jpg", "width": 500, "height": 375},
        {"id": 43, "file_name": "000000000043.jpg", "width": 500, "height": 375},
    ]
    captions = {
        "images": images,
        "annotations": [
            {"id": 9, "image_id": 42, "caption": "A man in a suit with a  red tie.\n"},
            {"id": 3, "image_id": 43, "caption": "Another picture."},
            {"id": 1, "image_id": 42, "caption": "a man wearing a tie stands by a frisbee"},
            {"id": 7, "image_id": 42, "caption": "A person in an office."},
            {"id": 2, "image_id": 42, "caption": "The man has a tie on."},
            {"id": 5, "image_id": 42, "caption": "Someone posing for a photo."},
        ],
    }
    instances = {
        "images": images,
        "categories": [{"id": 1, "name": "person"}, {"id": 32, "name": "tie"}, {"id": 34, "name": "frisbee"}],
        "annotations": [
            {"id": 1, "image_id": 42, "category_id": 1, "bbox": [0, 90, 107, 285]},
            {"id": 2, "image_id": 42, "category_id": 32, "bbox": [315, 83.25, 28, 110.25]},
            {"id": 3, "image_id": 42, "category_id": 34, "bbox": [510, 20, 30, 30]},  # wholly outside the image
            {"id": 4, "image_id": 42, "category_id": 34, "bbox": [400.5, 10, 300, 33.3]},  # runs off the right edge
            {"id": 5, "image_id": 42, "category_id": 32, "bbox": [100, 100, 0, 50]},  # zero width
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    return CocoSource(tmp_path / "captions.json", tmp_path / "instances.json", tmp_path / "images")


def test_the_context_is_the_papers_format(coco):
    item = next(iter(coco))
    # written by hand: all five captions in the file's order; boxes rounded to 3 decimals and
    # printed as plain floats (0/500 -> 0.0, 90/375 -> 0.24, 107/500 -> 0.214, 375/375 -> 1.0;
    # 315/500 -> 0.63, 83.25/375 -> 0.222, 343/500 -> 0.686, 193.5/375 -> 0.516; the frisbee is
    # clamped at the right edge: 400.5/500 -> 0.801, 10/375 -> 0.027, 1.0, 43.3/375 -> 0.115)
    assert render_context(item, use_boxes=True, decimals=3) == (
        "A man in a suit with a red tie.\n"
        "a man wearing a tie stands by a frisbee\n"
        "A person in an office.\n"
        "The man has a tie on.\n"
        "Someone posing for a photo.\n"
        "\n"
        "person: [0.0, 0.24, 0.214, 1.0]\n"
        "tie: [0.63, 0.222, 0.686, 0.516]\n"
        "frisbee: [0.801, 0.027, 1.0, 0.115]"
    )
    assert render_context(item, use_boxes=False) == "\n".join(item.captions)
    assert render_context(item, use_boxes=True, decimals=2).endswith("frisbee: [0.8, 0.03, 1.0, 0.12]")


def test_a_box_with_no_area_drops_that_box_not_the_image(coco):
    items = list(coco)
    assert [i.id for i in items] == ["42", "43"]
    assert [b.category for b in items[0].boxes] == ["person", "tie", "frisbee"]
    assert dict(coco.boxes_dropped) == {"no_area": 2} and dict(coco.skips.total) == {}
    list(coco)  # a second pass counts afresh
    assert dict(coco.boxes_dropped) == {"no_area": 2}


def test_format_box():
    assert (
        format_box(Box("traffic light", 0.6521, 0.0974, 0.689, 0.2283)) == "traffic light: [0.652, 0.097, 0.689, 0.228]"
    )
    assert format_box(Box("cat", 0, 0.5, 1, 1)) == "cat: [0.0, 0.5, 1.0, 1.0]"
    assert format_box(Box("cat", 0.1004, 0.5, 0.6299, 1), decimals=2) == "cat: [0.1, 0.5, 0.63, 1.0]"
    # more than 4 decimals: still plain decimals, never Python's exponent form (5e-05)
    assert format_box(Box("cat", 0.00005, 0.00001, 0.5, 1), decimals=6) == "cat: [0.00005, 0.00001, 0.5, 1.0]"


def test_messages_are_system_then_examples_then_the_image(coco):
    item = next(iter(coco))
    for kind in KINDS:
        spec = load_kind(kind)
        messages = build_messages(spec, item)
        assert messages[0] == {"role": "system", "content": spec.system}
        assert [m["role"] for m in messages[1:-1]] == ["user", "assistant"] * len(spec.examples)
        assert messages[1]["content"] == spec.examples[0][0] and messages[2]["content"] == spec.examples[0][1]
        assert messages[-1] == {"role": "user", "content": render_context(item, spec.use_boxes)}
    # the paper's counts of few-shot examples: 2 conversations, 3 descriptions, 3 reasoning
    assert [len(load_kind(kind).examples) for kind in KINDS] == [2, 3, 3]
    # the paper shows the conversation teacher captions only, the other two boxes as well
    assert "person: [" not in build_messages(load_kind("conversation"), item)[-1]["content"]
    assert "person: [0.0, 0.24, 0.214, 1.0]" in build_messages(load_kind("detail"), item)[-1]["content"]


def test_system_messages_say_what_the_paper_asks():
    systems = {kind: " ".join(load_kind(kind).system.split()) for kind in KINDS}  # lines joined
    for system in systems.values():
        assert "Never mention" in system and "captions" in system and "coordinates" in system
    assert "definite answers" in systems["conversation"]
    assert "write several paragraphs when the answer needs them" in systems["conversation"]
    assert "Keep the visual details out of the question" in systems["complex_reasoning"]
    assert (
        "how many there are, where they are, and how they are placed relative to each other"
        in (systems["complex_reasoning"])
    )
    assert "how many objects of each kind there are and where they are" in systems["detail"]


_BOX_LINE = re.compile(r"^(.+): \[(.+)\]$")


def test_the_few_shot_examples_are_rendered_as_the_generator_renders_and_pass_our_own_checks():
    for kind in KINDS:
        spec = load_kind(kind)
        for index, (context, response) in enumerate(spec.examples):
            captions, _, boxes = context.partition("\n\n")
            assert len(captions.splitlines()) == 5  # as COCO gives
            parsed = []
            for line in boxes.splitlines():
                category, numbers = _BOX_LINE.match(line).groups()
                parsed.append(Box(category, *(float(v) for v in numbers.split(", "))))
                assert format_box(parsed[-1]) == line  # the renderer's own format, number for number
            assert bool(parsed) == spec.use_boxes
            item = Item(str(index), "x.jpg", captions.splitlines(), parsed)
            assert render_context(item, spec.use_boxes) == context
            question = "Describe the image." if spec.single_answer else None
            # an example that copied a coordinate it was shown would teach the teacher to leak
            validate(to_conversation(spec, response, question), spec, shown_numbers(spec, item))


def test_example_responses_are_unwrapped_paragraphs():
    assert unwrap("Question:\nWhat is\n  it?\n===\nAnswer:\nA dog\nin a park.\n\nIt runs.") == (
        "Question:\nWhat is it?\n===\nAnswer:\nA dog in a park.\n\nIt runs."
    )
    [first, second] = load_kind("detail").examples[0][1].split("\n\n")
    assert "\n" not in first and "\n" not in second and first.startswith("The image shows a wet city street")
    conversation = load_kind("conversation").examples[0][1]
    assert "Answer:\nThe wet road is the first thing to watch. Water makes braking distances longer," in conversation


def test_unknown_kind_and_bad_prompt_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown kind 'story'"):
        load_kind("story")
    with pytest.raises(FileNotFoundError, match="no prompt file for kind 'detail': neither .*detail.yaml nor "):
        load_kind("detail", tmp_path)
    (tmp_path / "detail.yaml").write_text("system: hello\nquestions: [Describe it.]\n")
    with pytest.raises(ValueError, match="set detail_questions"):
        load_kind("detail", tmp_path)


# ------------------------------------------------------------------ LLaVA's layout


def test_a_llava_prompt_folder_is_read_as_written(tmp_path):
    root = write_llava_prompts(tmp_path / "prompts")
    files = LLAVA_FILES
    conversation = load_kind("conversation", root)
    assert conversation.system == "TEST SYSTEM conversation: talk about the picture.\nAsk and answer.  "
    assert conversation.examples == (
        (files["conversation/000_caps.txt"], files["conversation/000_conv.txt"]),
        (files["conversation/001_caps.txt"], "Question:\nWhat flies over the beach?\n===\nAnswer:\nA red kite.\n"),
    )
    detail = load_kind("detail", root)  # the kit's `detail` is LLaVA's detail_description
    assert detail.system == files["detail_description/system_message.txt"] and len(detail.examples) == 3
    assert detail.origin == str(root / "detail_description")
    complex_reasoning = load_kind("complex_reasoning", root)
    assert complex_reasoning.system.endswith("hard question.\n")  # nothing stripped
    assert [caps for caps, _ in complex_reasoning.examples] == [  # 9 before 10: by number, not by name
        "A wet road.\n\ncar: [0.1, 0.5, 0.4, 0.8]",
        "Snow on a roof.\n\nhouse: [0.2, 0.3, 0.8, 0.9]",
    ]
    # boxes and reply limits are the kit's for the kind
    for kind, spec in (("conversation", conversation), ("detail", detail), ("complex_reasoning", complex_reasoning)):
        kit = load_kind(kind)
        assert (spec.use_boxes, spec.min_turns, spec.max_turns, spec.min_chars, spec.max_chars) == (
            kit.use_boxes, kit.min_turns, kit.max_turns, kit.min_chars, kit.max_chars,
        )  # fmt: skip


def test_llava_messages_are_built_as_the_paper_did(tmp_path):
    root = write_llava_prompts(tmp_path / "prompts")
    item = Item("7", "x.jpg", ["A dog.", "A brown dog."], [Box("dog", 0.1, 0.25, 0.5, 1.0)])
    assert build_messages(load_kind("complex_reasoning", root), item) == [
        {"role": "system", "content": "TEST SYSTEM complex: ask one hard question.\n"},
        {"role": "user", "content": "A wet road.\n\ncar: [0.1, 0.5, 0.4, 0.8]"},
        {"role": "assistant", "content": "Question:\nWhy drive slowly?\n===\nAnswer:\nWet roads are slippery."},
        {"role": "user", "content": "Snow on a roof.\n\nhouse: [0.2, 0.3, 0.8, 0.9]"},
        {"role": "assistant", "content": "Question:\nWhy is the roof steep?\n===\nAnswer:\nSo the snow slides off."},
        {"role": "user", "content": "A dog.\nA brown dog.\n\ndog: [0.1, 0.25, 0.5, 1.0]"},
    ]


def test_a_broken_llava_folder_is_a_clear_error(tmp_path):
    root = write_llava_prompts(tmp_path / "prompts")
    (root / "conversation" / "002_caps.txt").write_text("An orphan.")
    with pytest.raises(ValueError, match=r"002_caps.txt has no partner conv file"):
        load_kind("conversation", root)
    (root / "detail_description" / "01_conv.txt").write_text("Same number as 001.")
    with pytest.raises(ValueError, match="two conv files numbered 1"):
        load_kind("detail", root)
    with pytest.raises(FileNotFoundError, match="holds one kind's LLaVA prompts; set prompts to the folder above"):
        load_kind("complex_reasoning", root / "complex_reasoning")
    (root / "complex_reasoning" / "system_message.txt").write_text("  \n")
    with pytest.raises(ValueError, match="system_message.txt is empty"):
        load_kind("complex_reasoning", root)


# ------------------------------------------------------------------ the detail questions and <image>


def test_detail_questions_come_from_a_file(tmp_path):
    kit = load_questions()
    assert len(kit) == 8 and kit[0] == "Describe the image in detail."
    (tmp_path / "q.txt").write_text("Describe it.\n\n  What is shown here?  \n")
    assert load_questions(tmp_path / "q.txt") == ("Describe it.", "What is shown here?")
    (tmp_path / "q.json").write_text(json.dumps(["One?", "Two?"]))
    assert load_questions(tmp_path / "q.json") == ("One?", "Two?")
    (tmp_path / "bad.yaml").write_text("question: one\n")
    with pytest.raises(ValueError, match="a list of question strings"):
        load_questions(tmp_path / "bad.yaml")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no question"):
        load_questions(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="no question file"):
        load_questions(tmp_path / "missing.txt")


_DRAWS = (
    "from src.instruct.sampling import image_first, pick_question\n"
    "qs = [str(i) for i in range(8)]\n"
    "print(''.join(pick_question(qs, 3, str(i)) for i in range(40)),"
    " ''.join('1' if image_first('random', 3, str(i), 'detail') else '0' for i in range(40)))"
)


def test_draws_are_seeded_per_sample_and_the_same_in_every_process():
    questions = [str(i) for i in range(8)]
    picks = [pick_question(questions, 3, str(i)) for i in range(400)]
    assert len(set(picks)) == 8  # every question gets used
    assert 30 <= min(picks.count(q) for q in questions)
    assert [pick_question(questions, 3, str(i)) for i in range(400)] == picks  # a rerun draws the same
    assert [pick_question(questions, 4, str(i)) for i in range(400)] != picks  # the seed matters
    firsts = [image_first("random", 3, str(i), "conversation") for i in range(400)]
    assert 160 <= sum(firsts) <= 240
    assert all(image_first("front", 3, str(i), "conversation") for i in range(50))
    with pytest.raises(ValueError, match="unknown image_position 'back'"):
        image_first("back", 0, "1", "detail")
    # another interpreter with another hash seed draws the same
    outputs = set()
    for hash_seed in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-c", _DRAWS], cwd=ROOT, capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
        )  # fmt: skip
        outputs.add(done.stdout)
    expected = (
        "".join(picks[:40])
        + " "
        + "".join("1" if image_first("random", 3, str(i), "detail") else "0" for i in range(40))
    )
    assert outputs == {expected + "\n"}


# ------------------------------------------------------------------ parsing and validation

CONVERSATION = load_kind("conversation")
DETAIL = load_kind("detail")
COMPLEX = load_kind("complex_reasoning")
GOOD = (
    "Question:\nWhat is the dog doing?\n===\nAnswer:\nThe dog is leaping to catch a frisbee.\n===\n"
    "Question:\nWhere is this happening?\n===\nAnswer:\nIn a grassy park on a sunny day, with trees behind."
)


def test_a_reply_becomes_a_llava_conversation():
    assert to_conversation(CONVERSATION, GOOD) == [
        {"from": "human", "value": "<image>\nWhat is the dog doing?"},
        {"from": "gpt", "value": "The dog is leaping to catch a frisbee."},
        {"from": "human", "value": "Where is this happening?"},
        {"from": "gpt", "value": "In a grassy park on a sunny day, with trees behind."},
    ]
    validate(to_conversation(CONVERSATION, GOOD), CONVERSATION)
    # labels on the same line, bold markdown labels and no separators parse the same
    loose = GOOD.replace("===\n", "").replace("Question:\n", "**Question:** ").replace("Answer:\n", "Answer: ")
    assert to_conversation(CONVERSATION, loose) == to_conversation(CONVERSATION, GOOD)


def test_the_image_tag_may_follow_the_first_question():
    after = to_conversation(CONVERSATION, GOOD, image_first=False)
    assert after[0] == {"from": "human", "value": "What is the dog doing?\n<image>"}  # as in LLaVA-Instruct-158K
    assert after[1:] == to_conversation(CONVERSATION, GOOD)[1:]
    validate(after, CONVERSATION, image_position="random")
    validate(to_conversation(CONVERSATION, GOOD), CONVERSATION, image_position="random")
    assert rejected(CONVERSATION, after) == "image_tag"  # front: only before


def test_a_detail_reply_answers_the_question_drawn_for_it():
    text = "A brown dog leaps across a sunny park to catch a red frisbee. " * 5
    question = pick_question(load_questions(), 0, "42")
    conversation = to_conversation(DETAIL, text, question)
    assert conversation == [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": text.strip()}]
    validate(conversation, DETAIL)
    with pytest.raises(ValueError, match="needs the question"):
        to_conversation(DETAIL, text)


def rejected(spec: KindSpec, conversation_or_text, shown=(), image_position="front") -> str:
    with pytest.raises(Rejected) as caught:
        conversation = conversation_or_text
        if isinstance(conversation_or_text, str):
            question = "Describe the image." if spec.single_answer else None
            conversation = to_conversation(spec, conversation_or_text, question)
        validate(conversation, spec, shown, image_position)
    return caught.value.reason


SHOWN = (0.1, 0.1, 0.5, 0.5, 0.412, 0.285, 0.75, 0.9)  # the coordinates the teacher saw


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("As the caption says, the dog is leaping to catch a frisbee.", "leaked_caption"),
        ("The captions mention a dog leaping in a park.", "leaked_caption"),
        ("Judging from the descriptions provided, it is a dog.", "leaked_caption"),
        ("According to the captions, a dog is leaping.", "leaked_caption"),
        ("Based on the given sentences, the dog is leaping.", "leaked_caption"),
        ("As described in the five sentences, the dog leaps.", "leaked_caption"),
        ("The information provided says it is a dog.", "leaked_caption"),
        ("The image descriptions agree that it is a dog.", "leaked_caption"),
        ("The dog is at [0.10, 0.10, 0.50, 0.50] in the picture.", "leaked_coordinates"),
        ("The dog spans (0.412, 0.285) to the middle.", "leaked_coordinates"),
        ("The dog's box starts at 0.100 from the left side.", "leaked_coordinates"),
        ("The dog's left side is at 0.412.", "leaked_coordinates"),
        ("It reaches 0.9 of the way down the picture.", "leaked_coordinates"),
        ("The bounding box of the dog covers half of the view.", "leaked_coordinates"),
        ("Its coordinates put it near the middle of the view.", "leaked_coordinates"),
    ],
)
def test_leaks_are_rejected(answer, reason):
    text = GOOD.replace("The dog is leaping to catch a frisbee.", answer)
    assert rejected(CONVERSATION, text, SHOWN) == reason


@pytest.mark.parametrize(
    "answer",
    [
        "The text above the door reads 'Park Cafe', and a dog leaps below it.",
        "The caption on the poster reads 'Lost dog', and the dog leaps beside it.",
        "A poster with a caption hangs on the fence while the dog leaps.",
        "The dog's owner holds a 0.75 liter bottle of water.",  # 0.75 was shown, but as a quantity it is no leak
        "The owner drank 0.5 l of water and paid $0.75 for it.",
        "The dog leaps about 0.5 m off the ground, 2.5 times its height, in 0.9 seconds.",
        "The ball is 0.41 of the way across, a number the teacher never saw.",
        "The following details stand out: the dog is brown and the frisbee is red.",
        "A description of the park is written on a sign next to the dog.",
        "The two dogs coordinated their jumps [1, 2] and [3, 4] times.",
    ],
)
def test_ordinary_text_is_not_a_leak(answer):
    text = GOOD.replace("The dog is leaping to catch a frisbee.", answer)
    validate(to_conversation(CONVERSATION, text), CONVERSATION, SHOWN)


def test_numbers_not_shown_are_never_leaks():
    assert coordinate_leak("The dog is at 0.412 of the width.", shown=()) is None  # conversation: no boxes shown
    assert coordinate_leak("The dog is at 0.412 of the width.", shown=(0.412,)) == "0.412"
    assert coordinate_leak("The dog is at 0.412.", shown=(0.412,)) == "0.412"  # at the end of a sentence
    assert coordinate_leak("It is 10.412 m long.", shown=(0.412,)) is None


def test_structure_and_length_are_checked():
    turns = to_conversation(CONVERSATION, GOOD)
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
    assert rejected(CONVERSATION, missing, image_position="random") == "image_tag"
    extra = [*turns[:3], dict(turns[3], value="It is in <image> a park, near trees.")]
    assert rejected(CONVERSATION, extra) == "image_tag"
    assert rejected(CONVERSATION, extra, image_position="random") == "image_tag"
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
    assert (
        shown_numbers(DETAIL, item) == ()
        and shown_numbers(CONVERSATION, Item("1", "a", ["A."], [Box("c", 0, 0, 1, 1)])) == ()
    )
