"""src.data.synthetic: deterministic demo scenes whose questions need the image."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from src.data.conversation import (
    MC_FORMATS,
    MC_INSTRUCTION,
    OPTION_LETTERS,
    multiple_choice_answer,
    multiple_choice_prompt,
)
from src.data.synthetic import (
    COLOURS,
    COUNT_WORDS,
    DEMO_MC_FORMAT,
    RELATIONS,
    SHAPES,
    SceneObject,
    SceneSpec,
    caption,
    generate_demo,
    make_sample,
    relation,
    sample_scene,
)
from src.eval.answers import read_choice

SPEC = SceneSpec()


def records(n: int, seed: int = 0) -> list[dict]:
    return [json.loads(make_sample(i, seed, SPEC)["json"]) for i in range(n)]


QUARTERS = ("top left", "top right", "bottom left", "bottom right")


def correct_answer(mc: dict, objects: list[dict]) -> str:
    """The answer word recomputed from the scene's objects, independently of the generator's choice."""
    objs = [SceneObject(**o) for o in objects]
    by_name = {o.name: o for o in objs}
    question = mc["question"]
    if mc["type"] == "colour":
        shape = question.removeprefix("What colour is the ").removesuffix("?")
        (obj,) = [o for o in objs if o.shape == shape]
        return obj.colour
    if mc["type"] == "shape":
        colour = question.removeprefix("What shape is the ").removesuffix(" object?")
        (obj,) = [o for o in objs if o.colour == colour]
        return obj.shape
    if mc["type"] == "count":
        assert question == "How many objects are there?"
        return COUNT_WORDS[len(objs) - 1]
    assert mc["type"] == "position"
    if question.startswith("Where in the image is the "):  # the default: a 2x2 grid's quarters
        (obj,) = [o for o in objs if o.name == question.removeprefix("Where in the image is the ").removesuffix("?")]
        return f"{('top', 'bottom')[obj.row]} {('left', 'right')[obj.col]}"
    a, b = question.removeprefix("Where is the ").removesuffix("?").split(" relative to the ")
    return relation(by_name[a], by_name[b])


def test_make_sample_is_deterministic():
    first, second = make_sample(7, 0, SPEC), make_sample(7, 0, SPEC)
    assert first == second
    assert isinstance(first["jpg"], bytes) and first["jpg"][:2] == b"\xff\xd8"
    assert first["__key__"] == "scene0_000007"
    assert make_sample(8, 0, SPEC)["json"] != first["json"]
    assert make_sample(7, 1, SPEC)["json"] != first["json"]


def test_generate_demo_is_byte_identical(tmp_path, demo_dir):
    """A second run (into another folder) reproduces the session fixture's files bit for bit."""
    generate_demo(tmp_path, train=40, val=10, test=10, per_shard=10, spec=SceneSpec())
    names = sorted(p.name for p in demo_dir.glob("*.tar"))
    assert names == sorted(p.name for p in tmp_path.glob("*.tar"))
    assert names == ["predict-000000.tar", "test-000000.tar"] + [f"train-00000{i}.tar" for i in range(4)] + [
        "val-000000.tar"
    ]
    for name in names + ["sizes.json", "tokenizer/tokenizer.json"]:
        assert (tmp_path / name).read_bytes() == (demo_dir / name).read_bytes(), name
    assert json.loads((tmp_path / "sizes.json").read_text()) == {
        "predict-000000.tar": 10,
        "test-000000.tar": 10,
        "train-000000.tar": 10,
        "train-000001.tar": 10,
        "train-000002.tar": 10,
        "train-000003.tar": 10,
        "val-000000.tar": 10,
    }


def test_shards_hold_the_samples_in_order(demo_dir, read_tar):
    samples = read_tar(demo_dir / "train-000001.tar")
    assert [key for key, _ in samples] == [f"scene0_{i:06d}" for i in range(10, 20)]
    assert samples[0][1] == {k: v for k, v in make_sample(10, 0, SPEC).items() if k != "__key__"}
    val = read_tar(demo_dir / "val-000000.tar")
    assert val[0][0] == "scene1_000000"  # splits use disjoint seeds


def test_correct_letter_is_uniform_and_the_answer_is_always_offered():
    letters: Counter[str] = Counter()
    types: Counter[str] = Counter()
    for record in records(300):
        assert record["mc"], record["id"]
        for mc in record["mc"]:
            options, answer = mc["options"], mc["answer"]
            assert len(options) == 4 and len(set(options)) == 4
            vocabulary = {"colour": COLOURS, "shape": SHAPES, "count": COUNT_WORDS, "position": QUARTERS}[mc["type"]]
            assert set(options) <= set(vocabulary)
            assert options[answer] == correct_answer(mc, record["objects"]), (record["id"], mc)
            letters[OPTION_LETTERS[answer]] += 1
            types[mc["type"]] += 1
    total = sum(letters.values())
    assert total > 600
    assert set(letters) == set("ABCD")
    for letter in "ABCD":
        assert 0.15 <= letters[letter] / total <= 0.35, letters
    assert set(types) == {"colour", "shape", "count", "position"}
    assert types["count"] == 300  # a count question always exists


def test_conversations_open_with_the_image():
    checked = 0
    for record in records(50):
        messages = record["conversations"]
        assert 6 <= len(messages) <= 10 and len(messages) % 2 == 0
        assert [m["from"] for m in messages] == ["human", "gpt"] * (len(messages) // 2)
        assert messages[0]["value"].startswith("<image>\n")
        assert sum(m["value"].count("<image>") for m in messages) == 1
        for human, gpt in zip(messages[::2], messages[1::2], strict=True):
            lines = human["value"].removeprefix("<image>\n").split("\n")
            if len(lines) == 1:  # an open question
                continue
            # a multiple-choice turn: question, 4 options, the format's instruction
            assert len(lines) == 6, lines
            options = [line[3:] for line in lines[1:5]]
            assert [line[:3] for line in lines[1:5]] == ["A. ", "B. ", "C. ", "D. "]
            assert lines[5] in MC_FORMATS.values()
            fmt = next(f for f, instruction in MC_FORMATS.items() if instruction == lines[5])
            assert fmt == DEMO_MC_FORMAT
            # the demo's format replies with the option's text, which names no letter
            assert read_choice(gpt["value"], 4, "official") is None, gpt["value"]
            assert gpt["value"] in options, gpt["value"]
            assert gpt["value"] == multiple_choice_answer(options, options.index(gpt["value"]), fmt)
            # and it is the right answer for the scene
            mc = {"question": lines[0], "type": question_type(lines[0])}
            assert gpt["value"] == correct_answer(mc, record["objects"]), (record["id"], lines)
            checked += 1
    assert checked > 50


def question_type(question: str) -> str:
    prefixes = {"What colour": "colour", "What shape": "shape", "How many": "count", "Where": "position"}
    (kind,) = [kind for prefix, kind in prefixes.items() if question.startswith(prefix)]
    return kind


def test_demo_mc_format_is_option():
    assert DEMO_MC_FORMAT == "option" and DEMO_MC_FORMAT in MC_FORMATS


def test_multiple_choice_turns_use_the_shared_prompt():
    record = records(1)[0]
    prompts = {multiple_choice_prompt(mc["question"], mc["options"]) for mc in record["mc"]}
    assert all(prompt.endswith(MC_INSTRUCTION) for prompt in prompts)


def test_scenes_have_distinct_cells_and_kinds():
    rng = random.Random(0)
    for _ in range(200):
        objects = sample_scene(rng, SPEC)
        assert 1 <= len(objects) <= SPEC.max_objects
        assert len({(o.row, o.col) for o in objects}) == len(objects)
        assert len({(o.colour, o.shape) for o in objects}) == len(objects)
        assert all(0 <= o.row < SPEC.grid and 0 <= o.col < SPEC.grid for o in objects)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ((0, 0), (0, 2), "left"),
        ((0, 3), (1, 0), "right"),
        ((0, 1), (3, 2), "above"),
        ((2, 2), (0, 1), "below"),
        ((1, 1), (2, 2), None),
    ],
)
def test_relation(a, b, expected):
    assert relation(SceneObject("red", "circle", *a), SceneObject("blue", "square", *b)) == expected


def test_caption_lists_objects_in_reading_order():
    objects = [
        SceneObject("red", "circle", 1, 0),
        SceneObject("blue", "square", 0, 1),
        SceneObject("green", "diamond", 0, 0),
    ]
    assert caption(objects) == "Three objects on a grey background: a green diamond, a blue square and a red circle."
    assert caption(objects[:1]) == "One object on a grey background: a red circle."


def test_images_match_the_spec():
    from io import BytesIO

    from PIL import Image

    image = Image.open(BytesIO(make_sample(0, 0, SceneSpec(image_size=48))["jpg"]))
    assert image.size == (48, 48) and image.mode == "RGB"


def test_position_questions_name_the_region_or_relate_two_objects():
    from src.data.synthetic import ask, region, regions

    objects = [SceneObject("red", "circle", 0, 1), SceneObject("blue", "square", 1, 1)]
    assert regions(2) == ["top left", "top right", "bottom left", "bottom right"]
    assert regions(3)[4] == "centre" and len(regions(3)) == 9
    assert [region(o, 2) for o in objects] == ["top right", "bottom right"]
    question, answer, vocabulary = ask("position", objects, random.Random(0), SceneSpec())
    assert question.startswith("Where in the image is the ") and answer in ("top right", "bottom right")
    assert vocabulary == regions(2)
    relative = SceneSpec(grid=2, relative_position=True)
    question, answer, vocabulary = ask("position", objects, random.Random(0), relative)
    assert (question, answer) in (
        ("Where is the red circle relative to the blue square?", "above"),
        ("Where is the blue square relative to the red circle?", "below"),
    )
    assert vocabulary == list(RELATIONS)
