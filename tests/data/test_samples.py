"""src.data.samples: one decoded sample read as conversations, caption or multiple choice."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from src.data.conversation import IGNORE_INDEX, OPTION_LETTERS, SampleError, multiple_choice_prompt
from src.data.decode import decode_sample
from src.data.samples import ExampleBuilder
from src.model.vision import ImageTransform

pytestmark = pytest.mark.usefixtures("single_thread")

IMAGE_TOKENS = 16  # conftest's encoders: a 64 px image, 16 px patches -> 4x4 placeholders


@pytest.fixture
def sample(demo_dir, read_tar):
    key, members = read_tar(demo_dir / "val-000000.tar")[0]
    return decode_sample(members)


def supervised(example) -> list[int]:
    return [int(t) for t in example.labels if t != IGNORE_INDEX]


def decoded(tokenizer, candidates: list[list[int]]) -> list[str]:
    return [tokenizer.decode(c) for c in candidates]


def test_mc_view_makes_one_example_per_question(make_builder, sample, tokenizer, image_transform):
    record, images = sample
    examples = make_builder("mc")(record, images)
    assert len(examples) == len(record["mc"]) >= 1
    pixels = image_transform(images[0])
    assert pixels.shape == (1, 3, 64, 64)  # one view of one image
    letter_replies = [[tokenizer.convert_tokens_to_ids(x), tokenizer.eos_token_id] for x in "ABCD"]
    for example, mc in zip(examples, record["mc"], strict=True):
        letter = OPTION_LETTERS[mc["answer"]]
        assert example.mc == {
            "candidates": letter_replies,
            "answer": mc["answer"],
            "type": mc["type"],
            "format": "letter",
        }
        assert supervised(example) == [tokenizer.convert_tokens_to_ids(letter), tokenizer.eos_token_id]
        assert supervised(example) == example.mc["candidates"][mc["answer"]]
        prompt = tokenizer.decode(
            [
                t
                for t, label in zip(example.input_ids.tolist(), example.labels.tolist(), strict=True)
                if label == IGNORE_INDEX and t != tokenizer.convert_tokens_to_ids("<image>")
            ]
        )
        expected = tokenizer.decode(
            tokenizer(
                "USER: " + multiple_choice_prompt(mc["question"], mc["options"]) + " ASSISTANT:",
                add_special_tokens=False,
            )["input_ids"]
        )
        assert prompt == "<s> " + expected
        assert int((example.input_ids == tokenizer.convert_tokens_to_ids("<image>")).sum()) == IMAGE_TOKENS
        assert example.input_ids.dtype == torch.long and example.labels.shape == example.input_ids.shape
        assert torch.equal(example.pixel_values, pixels)


def test_letter_candidates_decode_to_the_letters(make_builder, tokenizer):
    record = {"mc": [{"question": "What colour is the square?", "options": list("abcdef"), "answer": 4}]}
    (example,) = make_builder("mc", mc_format="letter")(record, [Image.new("RGB", (64, 64))])
    assert decoded(tokenizer, example.mc["candidates"]) == [f"{x} </s>" for x in "ABCDEF"]
    assert supervised(example) == example.mc["candidates"][4]
    assert tokenizer.unk_token_id not in [t for c in example.mc["candidates"] for t in c]


@pytest.mark.parametrize("template", ["vicuna_v1", "plain"])
def test_option_candidates_decode_to_each_option(make_builder, sample, tokenizer, template):
    record, images = sample
    examples = make_builder("mc", mc_format="option", template=template)(record, images)
    assert len(examples) == len(record["mc"])
    for example, mc in zip(examples, record["mc"], strict=True):
        assert example.mc["format"] == "option"
        assert (example.mc["answer"], example.mc["type"]) == (mc["answer"], mc["type"])
        # plain ends a caption with "\n" and no eos, as LLaVA's stage 1 (the demo tokenizer drops "\n")
        end = " </s>" if template == "vicuna_v1" else ""
        end_ids = [tokenizer.eos_token_id] if template == "vicuna_v1" else []
        assert decoded(tokenizer, example.mc["candidates"]) == [f"{option}{end}" for option in mc["options"]]
        # the right candidate is exactly what the example supervises
        assert example.mc["candidates"][mc["answer"]] == supervised(example)
        assert tokenizer.decode(supervised(example)) == f"{mc['options'][mc['answer']]}{end}"
        assert example.mc["candidates"] == [
            tokenizer(option, add_special_tokens=False)["input_ids"] + end_ids for option in mc["options"]
        ]


def test_option_candidates_of_several_words_and_lengths(make_builder, tokenizer):
    options = ["red circle", "blue", "a green square", "yellow"]
    record = {"mc": [{"question": "What is drawn?", "options": options, "answer": 2, "type": "kind"}]}
    (example,) = make_builder("mc", mc_format="option")(record, [Image.new("RGB", (64, 64))])
    assert decoded(tokenizer, example.mc["candidates"]) == [f"{option} </s>" for option in options]
    assert [len(c) for c in example.mc["candidates"]] == [3, 2, 4, 2]
    assert example.mc["candidates"][2] == supervised(example)
    assert example.mc["type"] == "kind"


def test_reasoned_mc_view(make_builder, sample, tokenizer):
    record, images = sample
    builder = make_builder("mc", mc_format="reasoned")
    examples = builder(record, images)
    assert len(examples) == len(record["mc"])
    for example, mc in zip(examples, record["mc"], strict=True):
        word, letter = mc["options"][mc["answer"]], OPTION_LETTERS[mc["answer"]]
        assert tokenizer.decode(supervised(example)) == f"{word} . The answer is {letter} . </s>"
        assert example.mc["format"] == "reasoned"
        assert decoded(tokenizer, example.mc["candidates"]) == [
            f"{option} . The answer is {x} . </s>" for option, x in zip(mc["options"], "ABCD", strict=True)
        ]
        assert example.mc["candidates"][mc["answer"]] == supervised(example)
    assert tokenizer.unk_token_id not in torch.cat([e.input_ids for e in examples]).tolist()


def test_mc_type_defaults_to_all(make_builder, tokenizer):
    record = {"mc": [{"question": "q", "options": ["red", "blue"], "answer": 1}]}
    (example,) = make_builder("mc")(record, [Image.new("RGB", (64, 64))])
    assert example.mc["type"] == "all" and example.mc["answer"] == 1


def test_unknown_mc_format(make_builder):
    with pytest.raises(
        ValueError,
        match=re.escape("unknown multiple-choice format 'free'; choose one of ['letter', 'option', 'reasoned']"),
    ):
        make_builder("mc", mc_format="free")


def test_a_list_of_views_reads_each_sample_every_way_in_order(make_builder, sample, tokenizer):
    record, images = sample
    examples = make_builder(["conversations", "caption"])(record, images)
    (conversation,) = make_builder("conversations")(record, images)
    (caption,) = make_builder("caption")(record, images)
    assert len(examples) == 2
    for got, expected in zip(examples, (conversation, caption), strict=True):
        assert torch.equal(got.input_ids, expected.input_ids) and torch.equal(got.labels, expected.labels)
        assert torch.equal(got.pixel_values, expected.pixel_values) and got.mc is None
    # the other order, and a view with several examples (one per question) in the list
    reversed_views = make_builder(["caption", "conversations"])(record, images)
    assert [e.input_ids.tolist() for e in reversed_views] == [
        caption.input_ids.tolist(),
        conversation.input_ids.tolist(),
    ]
    mixed = make_builder(["mc", "caption"])(record, images)
    assert len(mixed) == len(record["mc"]) + 1
    assert [e.mc is not None for e in mixed] == [True] * len(record["mc"]) + [False]
    assert mixed[-1].input_ids.tolist() == caption.input_ids.tolist()
    assert make_builder(("caption",))(record, images)[0].input_ids.tolist() == caption.input_ids.tolist()


def test_conversations_view(make_builder, sample, make_encoder):
    record, images = sample
    (example,) = make_builder("conversations")(record, images)
    expected = make_encoder().encode(record["conversations"], num_images=1)
    assert example.input_ids.tolist() == expected.input_ids
    assert example.labels.tolist() == expected.labels
    assert example.mc is None and example.pixel_values.shape == (1, 3, 64, 64)


def test_caption_view(make_builder, sample, tokenizer):
    record, images = sample
    (example,) = make_builder("caption")(record, images)
    assert (
        tokenizer.decode(supervised(example))
        == tokenizer.decode(tokenizer(record["caption"], add_special_tokens=False)["input_ids"]) + " </s>"
    )


def test_blank_images_are_constant_grey(make_builder, sample):
    record, images = sample
    (example,) = make_builder("conversations", blank_images=True)(record, images)
    grey = (128 / 255 - 0.5) / 0.5
    torch.testing.assert_close(example.pixel_values, torch.full((1, 3, 64, 64), grey))


def test_text_only_sample_has_no_pixels(make_builder):
    record = {
        "conversations": [{"from": "human", "value": "How many objects are there?"}, {"from": "gpt", "value": "two"}]
    }
    (example,) = make_builder("conversations")(record, [])
    assert example.pixel_values is None


def test_several_images_are_stacked_in_order(make_builder, image_transform):
    images = [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))]
    record = {"caption": "A red circle."}
    (example,) = make_builder("caption")(record, images)
    views = [image_transform(i) for i in images]
    assert torch.equal(example.pixel_values, torch.cat([v.reshape(-1, *v.shape[-3:]) for v in views]))
    assert int((example.input_ids == make_builder().encoder.image_token_id).sum()) == 2 * IMAGE_TOKENS


class TiledTransform:
    """Stands in for anyres: a wide image becomes 3 views (global + 2 crops), others 1."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        views = 3 if image.width > image.height else 1
        return torch.full((views, 3, 4, 4), float(image.width))


def test_tiled_images_take_their_views_tokens_at_their_own_tag(make_encoder):
    builder = ExampleBuilder(make_encoder(), TiledTransform(), "conversations")
    record = {
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is here?"},
            {"from": "gpt", "value": "a red circle"},
            {"from": "human", "value": "And here? <image>"},
            {"from": "gpt", "value": "a blue square"},
        ]
    }
    wide, square = Image.new("RGB", (64, 32)), Image.new("RGB", (32, 32))
    (example,) = builder(record, [wide, square])
    assert example.pixel_values.shape == (4, 3, 4, 4)
    assert example.pixel_values[:3].eq(64).all() and example.pixel_values[3].eq(32).all()
    ids = example.input_ids.tolist()
    image_id = builder.encoder.image_token_id
    runs = []  # (start, length) of each run of placeholders
    for i, t in enumerate(ids):
        if t == image_id and (i == 0 or ids[i - 1] != image_id):
            runs.append([i, 0])
        if t == image_id:
            runs[-1][1] += 1
    assert [length for _, length in runs] == [3 * IMAGE_TOKENS, IMAGE_TOKENS]
    assert all(int(example.labels[i]) == IGNORE_INDEX for i, t in enumerate(ids) if t == image_id)


def test_truncation_keeps_whole_tiled_images_or_drops_the_sample(make_encoder):
    builder = ExampleBuilder(make_encoder(max_length=2 * IMAGE_TOKENS), TiledTransform(), "caption")
    with pytest.raises(SampleError) as info:
        builder({"caption": "A red circle."}, [Image.new("RGB", (64, 32))])
    assert info.value.reason == "too_long"


@pytest.mark.parametrize(
    ("view", "record", "reason"),
    [
        ("conversations", {"caption": "x"}, "missing_field"),
        ("caption", {"conversations": []}, "missing_field"),
        ("caption", {"caption": "   "}, "missing_field"),
        ("mc", {"caption": "x"}, "missing_field"),
        ("mc", {"mc": []}, "missing_field"),
        ("mc", {"mc": [{"question": "q", "options": ["a", "b"]}]}, "bad_mc"),
        ("mc", {"mc": [{"question": "q", "options": ["a", "b"], "answer": 2}]}, "bad_mc"),
        ("mc", {"mc": [{"question": "q", "options": ["a", "b"], "answer": -1}]}, "bad_mc"),
        ("mc", {"mc": [{"question": "q", "options": ["a", "b"], "answer": "B"}]}, "bad_mc"),
        ("mc", {"mc": ["not a dict"]}, "bad_mc"),
    ],
)
def test_unusable_records_are_sample_errors(make_builder, view, record, reason):
    image = Image.new("RGB", (64, 64))
    with pytest.raises(SampleError) as info:
        make_builder(view)(record, [image])
    assert info.value.reason == reason


@pytest.mark.parametrize("options", [["only"], [], list("abcdefghi")])
def test_wrong_option_count_is_bad_mc(make_builder, options):
    with pytest.raises(SampleError) as info:
        make_builder("mc")({"mc": [{"question": "q", "options": options, "answer": 0}]}, [Image.new("RGB", (64, 64))])
    assert info.value.reason == "bad_mc"
    assert str(info.value) == f"bad_mc: question 0: {len(options)} options; a question needs 2 to 8"


def test_eight_options_are_enough(make_builder, tokenizer):
    record = {"mc": [{"question": "q", "options": list("abcdefgh"), "answer": 7}]}
    (example,) = make_builder("mc")(record, [Image.new("RGB", (64, 64))])
    assert len(example.mc["candidates"]) == 8 and example.mc["answer"] == 7


@pytest.mark.parametrize("view", ["chat", ["caption", "chat"]])
def test_unknown_view(view):
    with pytest.raises(ValueError, match=r"unknown view 'chat'; choose one of \['conversations', 'caption', 'mc'\]"):
        ExampleBuilder(None, ImageTransform(8, (0.5,) * 3, (0.5,) * 3), view)


def test_json_round_trip_of_the_fixture(sample, demo_dir, read_tar):
    record, _ = sample
    assert record == json.loads(read_tar(demo_dir / "val-000000.tar")[0][1]["json"])


def test_image_position_last_is_moved_to_the_front_by_llava_templates(make_encoder, image_transform, tokenizer):
    """LLaVA's `preprocess_multimodal` moves a turn's one <image> tag to its front, so under a
    LLaVA-named template (vicuna_v1 here) image_position="last" gives the same ids as "first";
    it matters for chat_template only (src/data/conversation.py, docs/fidelity.md)."""
    record = {"mc": [{"question": "What colour is the square?", "options": ["red", "blue"], "answer": 1}]}
    image = Image.new("RGB", (64, 64), (200, 10, 10))
    first = ExampleBuilder(make_encoder(), image_transform, "mc", mc_format="option")(record, [image])[0]
    last = ExampleBuilder(make_encoder(), image_transform, "mc", mc_format="option", image_position="last")(
        record, [image]
    )[0]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    first_ids, last_ids = first.input_ids.tolist(), last.input_ids.tolist()
    assert first_ids.count(image_id) == 16
    assert first_ids.index(image_id) < first_ids.index(tokenizer.convert_tokens_to_ids("square"))
    assert last_ids == first_ids and last.labels.tolist() == first.labels.tolist()


# ---- the view registry (src.data.views): a view is a function registered by name -------------------
@pytest.fixture
def views(monkeypatch):
    """The registry, with whatever a test registers removed afterwards."""
    from src.data.views import VIEWS

    monkeypatch.setattr(VIEWS, "_items", dict(VIEWS._items))
    return VIEWS


def test_the_built_in_views_are_registered_in_the_order_the_docs_list_them():
    from src.data.views import VIEWS

    assert VIEWS.names() == list(VIEWS) == ["conversations", "caption", "mc"]


def test_a_built_in_view_returns_its_chats(sample):
    from src.data.views import VIEWS, Chat, ViewSettings

    record, images = sample
    assert VIEWS.get("caption")(record, images, ViewSettings()) == [
        Chat([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": record["caption"]}])
    ]
    chats = VIEWS.get("mc")(record, images, ViewSettings(mc_format="option", image_position="last"))
    first = record["mc"][0]
    assert chats[0].messages[0]["value"] == multiple_choice_prompt(first["question"], first["options"], "option") + (
        "\n<image>"
    )
    assert chats[0].mc == {"options": first["options"], "answer": first["answer"], "type": first["type"]}
    with pytest.raises(SampleError, match="missing_image: the sample holds no image; the view needs one"):
        VIEWS.get("caption")({"caption": "a red square"}, [], ViewSettings())


def test_a_registered_view_is_read_by_name_with_the_builder_s_settings(views, make_encoder, image_transform):
    from src.data.datamodule import LlavaDataModule
    from src.data.views import Chat, ViewSettings, image_tags

    seen: list[ViewSettings] = []

    @views.register("caption_question")
    def caption_question(record: dict, images: list, settings: ViewSettings) -> list[Chat]:
        seen.append(settings)
        question = f"{image_tags(len(images))}\nDescribe the image."
        return [Chat([{"from": "human", "value": question}, {"from": "gpt", "value": record["caption"]}])]

    record, image = {"caption": "A red square."}, Image.new("RGB", (64, 64), (200, 0, 0))
    builder = ExampleBuilder(make_encoder(), image_transform, ["caption_question", "caption"], mc_format="option")
    mine, caption = builder(record, [image])
    expected = make_encoder().encode(
        [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "A red square."}],
        num_images=1,
    )
    assert (mine.input_ids.tolist(), mine.labels.tolist()) == (expected.input_ids, expected.labels)
    assert torch.equal(mine.pixel_values, image_transform(image)) and mine.mc is None
    assert supervised(mine) == supervised(caption)  # the same reply, asked another way
    assert seen == [ViewSettings(mc_format="option", image_position="first")]
    # chosen by name in the config; an unknown name lists it after the built-ins
    assert LlavaDataModule(train_view="caption_question").hparams.train_view == "caption_question"
    with pytest.raises(
        ValueError, match=re.escape("unknown view 'chat'; choose one of ['conversations', 'caption', 'mc', 'caption_")
    ):
        LlavaDataModule(train_view="chat")


def test_a_view_name_is_registered_once_and_prompt_is_taken(views):
    with pytest.raises(ValueError, match="view 'caption' registered twice"):
        views.register("caption")(lambda record, images, settings: [])
    with pytest.raises(ValueError, match="view name 'prompt' is taken by prediction"):
        views.register("prompt")(lambda record, images, settings: [])


def test_a_view_returning_something_else_than_chats_is_named(views, make_encoder, image_transform):
    views.register("broken")(lambda record, images, settings: [record["caption"]])
    builder = ExampleBuilder(make_encoder(), image_transform, "broken")
    with pytest.raises(TypeError, match="view 'broken' gave a str; a view returns a list of Chat"):
        builder({"caption": "x"}, [Image.new("RGB", (64, 64))])
