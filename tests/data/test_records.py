"""src.data.records: one typed check per kind of record fault, the same in the writer, the inspector
and the stream; plus one test per fault that used to end a run or train on wrong data (issue 15)."""

from __future__ import annotations

import json
import logging
import re
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import webdataset as wds
from PIL import EpsImagePlugin, Image

from src.data.conversation import SampleError
from src.data.datamodule import LlavaDataModule, ShardStream, count_samples
from src.data.decode import ImagePolicy, decode_image, decode_sample
from src.data.inputs import read_records
from src.data.records import (
    MAX_DEPTH,
    REASONS,
    Question,
    as_object,
    check_images,
    llava_record,
    parse_json,
    parse_object,
    questions,
    read_sizes_table,
)
from src.data.shards import inspect_shards, write_shards

pytestmark = pytest.mark.usefixtures("single_thread")

IMAGE_TOKENS = 16
GOOD_CHAT = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "It is red."}]
DEEP = b"[" * 1000 + b"]" * 1000  # 2 KB, past Python's recursion limit


def reason_of(call, *args, **kwargs) -> str:
    with pytest.raises(SampleError) as info:
        call(*args, **kwargs)
    return info.value.reason


def write_tar(path: Path, samples: list[dict]) -> Path:
    with open(path, "wb") as stream, wds.TarWriter(stream, encoder=False) as writer:
        for sample in samples:
            writer.write(sample)
    return path


def stream_skips(shards: list[Path], builder) -> tuple[int, dict[str, int]]:
    """(examples, skips by reason) of one evaluation pass."""
    stream = ShardStream([str(s) for s in shards], builder, batch_size=4, pad_id=0)
    examples = sum(b["input_ids"].shape[0] for b in stream if "input_ids" in b)
    return examples, dict(stream.skips.total)


def fake_trainer(tokenizer, image_transform):
    spec = {"tokenizer": tokenizer, "image_transform": image_transform, "image_tokens": IMAGE_TOKENS}
    alone = SimpleNamespace(root_device="cpu", reduce=lambda tensor, reduce_op: tensor)
    return SimpleNamespace(
        lightning_module=SimpleNamespace(data_spec=lambda: spec), global_rank=0, world_size=1, strategy=alone
    )


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and whose pixel data is a few bytes: only a decoder
    that trusts the header before decoding refuses it as too large rather than as broken."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


# --- the record checks ----------------------------------------------------------------------


def test_every_reason_raised_in_src_is_documented():
    """REASONS (and docs/data.md) list every skip reason the data code raises, and no other."""
    src = Path(__file__).parents[2] / "src" / "data"
    raised = set()
    for path in src.glob("*.py"):
        raised |= set(re.findall(r'SampleError\(\s*"([a-z_]+)"', path.read_text()))
        raised |= set(re.findall(r'skips?\.skip\(\s*"([a-z_]+)"', path.read_text()))
    assert raised <= set(REASONS), raised - set(REASONS)
    docs = (Path(__file__).parents[2] / "docs" / "data.md").read_text()
    assert [r for r in REASONS if f"`{r}`" not in docs] == []


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b"{", "bad_json"),
        (b"\xff\xfe\x00", "bad_json"),
        (b"1" * 5000, "bad_json"),  # past Python's digit limit for int()
        (DEEP, "too_deep"),
        (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "too_deep"),
        (b'{"a": "\\ud800"}', "bad_text"),  # an unpaired surrogate: no tokenizer takes it
        ('{"a": "\ud800"}'.encode("utf-8", "surrogatepass"), "bad_text"),
    ],
)
def test_parse_json_faults(text, reason):
    assert reason_of(parse_json, text) == reason


def test_parse_json_keeps_what_is_fine():
    nested = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
    assert parse_json(nested) is not None
    assert parse_json('{"a": "\\ud83d\\ude00 \u00e9"}'.encode()) == {"a": "\U0001f600 \u00e9"}  # a pair is fine
    assert parse_object(b'{"k": [1, {"x": null}]}') == {"k": [1, {"x": None}]}
    assert reason_of(parse_object, b"[1]") == "not_an_object"


def test_as_object_checks_parsed_records_alike():
    deep: list = []
    for _ in range(MAX_DEPTH + 2):
        deep = [deep]
    assert reason_of(as_object, {"x": deep}) == "too_deep"
    assert reason_of(as_object, "text") == "not_an_object"
    assert reason_of(as_object, {"x": "\ud800"}) == "bad_text"
    assert reason_of(as_object, SampleError("bad_json", "line 3")) == "bad_json"


@pytest.mark.parametrize(
    ("mc", "message"),
    [
        (5, "'mc' must be a list of question records, got int"),
        ("question?", "'mc' must be a list of question records, got str"),
        ([5], "question 0 must be an object, got int"),
        ([{"question": 7, "options": ["a", "b"], "answer": 0}], "question 0: the question must be a string, got int"),
        ([{"question": "q", "options": "ab", "answer": 0}], "question 0: options must be a list of strings, got str"),
        ([{"question": "q", "options": ["a", 2], "answer": 0}], "question 0: every option must be a string"),
        ([{"question": "q", "options": ["a", "b"], "answer": True}], "question 0: the answer must be an option index"),
        ([{"question": "q", "options": ["a", "b"], "answer": 1.0}], "question 0: the answer must be an option index"),
        ([{"question": "q", "options": ["a", "b"], "answer": 2}], "question 0: answer 2 is not one of 2 options"),
        ([{"question": "q", "options": ["a", "b"]}], "question 0 lacks answer"),
        ([{"question": "q", "options": ["a", "b"], "answer": 0, "type": 3}], "type must be a string or a list"),
    ],
)
def test_bad_mc_says_what_is_wrong(mc, message):
    with pytest.raises(SampleError) as info:
        questions({"mc": mc})
    assert info.value.reason == "bad_mc"
    assert message in str(info.value)


def test_questions_are_typed():
    record = {"mc": [{"question": "q", "options": ["a", "b"], "answer": 1, "type": ["IMG", "NAT"]}]}
    assert questions(record) == [Question("q", ("a", "b"), 1, ("IMG", "NAT"))]
    assert reason_of(questions, {"mc": []}) == "missing_field"


def test_check_images():
    check_images({"image": "a.jpg"}, 1, needs_image=True)
    check_images({"mc": []}, 0, needs_image=False)  # a text-only question (ScienceQA has them)
    assert reason_of(check_images, {"image": ["a.jpg", "b.jpg"]}, 1, needs_image=False) == "missing_image"
    assert reason_of(check_images, {"caption": "c"}, 0, needs_image=True) == "missing_image"
    assert reason_of(check_images, {"conversations": GOOD_CHAT}, 0, needs_image=False) == "missing_image"


def test_llava_record_is_what_the_writer_takes():
    checked = llava_record({"id": 1, "image": "a/b.jpg", "conversations": GOOD_CHAT})
    assert (checked.turns, checked.image_paths) == ([("<image>\nWhat colour is it?", "It is red.")], ["a/b.jpg"])
    assert reason_of(llava_record, {"image": "a/b.jpg"}) == "missing_field"
    assert reason_of(llava_record, {"conversations": GOOD_CHAT, "image": "a.jpg", "mc": 5}) == "bad_mc"
    assert reason_of(llava_record, {"conversations": GOOD_CHAT, "image": "a.jpg", "caption": 5}) == "bad_caption"
    assert reason_of(llava_record, {"conversations": GOOD_CHAT, "image": "/etc/passwd"}) == "bad_image_path"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must map shard names to sample counts, got a list"),
        ('{"a.tar": "10"}', "the count of 'a.tar' must be a whole number >= 0, got str"),
        ('{"a.tar": 2.5}', "the count of 'a.tar' must be a whole number >= 0, got 2.5"),
        ('{"a.tar": -1}', "the count of 'a.tar' must be a whole number >= 0, got -1"),
        ('{"a.tar": true}', "the count of 'a.tar' must be a whole number >= 0, got True"),
        ("[" * 1000 + "]" * 1000, "is nested too deeply"),
    ],
)
def test_a_broken_sizes_json_names_the_file(tmp_path, text, message):
    path = tmp_path / "sizes.json"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        read_sizes_table(path)
    assert str(path) in str(info.value) and message in str(info.value)


# --- one test per fault of issue 15 ---------------------------------------------------------


def test_a_deeply_nested_json_member_is_skipped_as_too_deep(tmp_path, jpeg_bytes, make_builder):
    shard = write_tar(tmp_path / "deep.tar", [
        {"__key__": "deep", "jpg": jpeg_bytes(), "json": b'{"conversations": ' + DEEP + b"}"},
        {"__key__": "good", "jpg": jpeg_bytes(), "json": json.dumps({"conversations": GOOD_CHAT}).encode()},
    ])  # fmt: skip
    assert stream_skips([shard], make_builder("conversations")) == (1, {"too_deep": 1})


def test_a_deeply_nested_input_record_is_skipped_by_the_writer(tmp_path):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_bytes(b'{"conversations": ' + DEEP + b"}\n" + json.dumps({"conversations": GOOD_CHAT[1:]}).encode())
    records, _ = read_records(jsonl)
    summary = write_shards(records, tmp_path, tmp_path / "out")
    assert summary["skipped"] == {"too_deep": 1, "empty_conversation": 1}
    whole = tmp_path / "in.json"
    whole.write_bytes(b'[{"conversations": ' + DEEP + b"}]")
    with pytest.raises(ValueError, match=f"{whole} holds a record nested deeper than Python's JSON parser allows"):
        read_records(whole)


@pytest.mark.parametrize(
    "mc",
    [
        5,
        [{"question": 5, "options": ["red", "blue"], "answer": 0}],
        [{"question": "Which colour?", "options": "rb", "answer": 0}],  # not split into characters
        [{"question": "Which colour?", "options": ["red", "blue"], "answer": True}],  # not index 1
    ],
)
def test_a_malformed_mc_field_is_skipped_by_the_mc_view(tmp_path, jpeg_bytes, make_builder, mc):
    good = {"mc": [{"question": "Which colour?", "options": ["red", "blue"], "answer": 0}]}
    shard = write_tar(tmp_path / "mc.tar", [
        {"__key__": "bad", "jpg": jpeg_bytes(), "json": json.dumps({"mc": mc}).encode()},
        {"__key__": "good", "jpg": jpeg_bytes(), "json": json.dumps(good).encode()},
    ])  # fmt: skip
    assert stream_skips([shard], make_builder("mc")) == (1, {"bad_mc": 1})


def test_a_broken_sizes_json_stops_start_up_naming_it(demo_dir, tmp_path, tokenizer, image_transform):
    for name in ("train-000000.tar", "train-000001.tar"):
        (tmp_path / name).write_bytes((demo_dir / name).read_bytes())
    sizes = tmp_path / "sizes.json"
    shards = [str(tmp_path / "train-000000.tar"), str(tmp_path / "train-000001.tar")]
    for text, message in [("{oops", "is not valid JSON"), ('{"train-000000.tar": "10"}', "must be a whole number")]:
        sizes.write_text(text)
        with pytest.raises(ValueError, match=message) as info:
            count_samples(shards)
        assert str(sizes) in str(info.value)
        dm = LlavaDataModule(train_shards=shards, batch_size=2, num_workers=0, system_prompt="")
        dm.trainer = fake_trainer(tokenizer, image_transform)
        with pytest.raises(ValueError, match=message):
            dm.train_dataloader()


@pytest.mark.parametrize(("members", "reason"), [({}, "missing_image"), ({"gif": "GIF"}, "bad_image_format")])
@pytest.mark.parametrize("view", ["caption", "mc"])
def test_a_sample_without_a_decodable_image_is_skipped(tmp_path, jpeg_bytes, make_builder, members, reason, view):
    record = {
        "caption": "A red square.",
        "conversations": GOOD_CHAT,  # its <image> tag is what tells a question with an image from one without
        "mc": [{"question": "Which colour?", "options": ["red", "blue"], "answer": 0}],
    }
    image_members = {suffix: jpeg_bytes(fmt=fmt) for suffix, fmt in members.items()}
    shard = write_tar(tmp_path / "s.tar", [
        {"__key__": "lost", "json": json.dumps(record).encode(), **image_members},
        {"__key__": "good", "jpg": jpeg_bytes(), "json": json.dumps(record).encode()},
    ])  # fmt: skip
    assert stream_skips([shard], make_builder(view)) == (1, {reason: 1})


def test_a_text_only_question_still_reads(tmp_path, make_builder):
    """ScienceQA's questions without an image have no image, no path and no <image> tag."""
    record = {"mc": [{"question": "Which is a mammal?", "options": ["cat", "trout"], "answer": 0}]}
    shard = write_tar(tmp_path / "t.tar", [{"__key__": "t", "json": json.dumps(record).encode()}])
    assert stream_skips([shard], make_builder("mc")) == (1, {})


def test_a_missing_evaluation_shard_stops_validate(demo_dir, tokenizer, image_transform):
    for spec in [f"{demo_dir}/val-000009.tar", f"{demo_dir}/nope-{{000000..000003}}.tar"]:
        dm = LlavaDataModule(train_shards=f"{demo_dir}/train-000000.tar", val_shards=spec, test_shards=spec,
                             batch_size=2, num_workers=0, system_prompt="")  # fmt: skip
        dm.trainer = fake_trainer(tokenizer, image_transform)
        first = spec.replace("{000000..000003}", "000000")
        for loader, name in [(dm.val_dataloader, "val_shards"), (dm.test_dataloader, "test_shards")]:
            with pytest.raises(FileNotFoundError) as info:
                loader()
            assert str(info.value).startswith(f"data.{name}: {first} does not exist;")
            assert repr(spec) in str(info.value)


def test_missing_training_shards_are_said_not_to_exist(tmp_path, tokenizer, image_transform):
    spec = f"{tmp_path}/train-{{000000..000003}}.tar"
    dm = LlavaDataModule(train_shards=spec, batch_size=2, num_workers=0, system_prompt="")
    dm.trainer = fake_trainer(tokenizer, image_transform)
    with pytest.raises(FileNotFoundError) as info:
        dm.train_dataloader()
    assert str(info.value) == (
        f"training shards: {tmp_path}/train-000000.tar does not exist; 4 of the 4 shards named by {spec!r} are missing"
    )
    assert "sizes.json" not in str(info.value)
    glob = f"{tmp_path}/train-*.tar"
    dm = LlavaDataModule(train_shards=glob, batch_size=2, num_workers=0, system_prompt="", samples_per_epoch=8)
    dm.trainer = fake_trainer(tokenizer, image_transform)
    with pytest.raises(FileNotFoundError, match=r"\(brace patterns expand, \* globs do not\)"):
        dm.train_dataloader()


@pytest.mark.parametrize("conversations", [None, "hello", {"from": "human"}, 5])
def test_a_conversation_that_is_not_a_list_is_bad_conversation(make_builder, conversations):
    record = {"conversations": conversations, "image": "a.jpg"}
    expected = "missing_field" if conversations is None else "bad_conversation"
    assert reason_of(make_builder("conversations"), record, [Image.new("RGB", (64, 64))]) == expected
    assert reason_of(llava_record, record) == expected


def test_an_eps_payload_never_reaches_ghostscript(monkeypatch, jpeg_bytes):
    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(self) or 1 / 0)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n" + b"%" * 100
    for member in ("jpg", "eps"):
        with pytest.raises(SampleError) as info:
            decode_sample({"__key__": "x", member: eps})
        assert str(info.value) == "bad_image_format: the image is EPS; the data config allows JPEG, PNG, WEBP"
    assert opened == []
    # configurable: a policy that allows a format reads it (by content, whatever the member's name)
    gif = jpeg_bytes(fmt="GIF")
    assert reason_of(decode_image, gif) == "bad_image_format"
    assert decode_image(gif, policy=ImagePolicy(("JPEG", "GIF"))).size == (64, 64)
    with pytest.raises(ValueError, match=r"unknown image formats \['JPG'\]"):
        ImagePolicy(("JPEG", "JPG"))


def test_a_pixel_bomb_is_refused_from_its_header(monkeypatch):
    bomb = png_header_only(12_000, 12_000)  # 144 million pixels: between Pillow's warning and its error
    assert len(bomb) < 200
    with pytest.raises(SampleError) as info:
        decode_image(bomb)
    assert str(info.value) == "too_many_pixels: a 12000 x 12000 image is over the budget of 40000000 pixels"
    small = png_header_only(300, 300)
    assert reason_of(decode_image, small, policy=ImagePolicy(max_pixels=300 * 299)) == "too_many_pixels"
    assert reason_of(decode_image, small) == "bad_image"  # under budget, so decoded: its data is short


def test_skip_messages_name_the_shard_and_the_key(tmp_path, jpeg_bytes, make_builder, caplog):
    shard = write_tar(tmp_path / "named-000000.tar", [{"__key__": "cat_42", "jpg": jpeg_bytes(), "json": b"{"}])
    with caplog.at_level(logging.WARNING, logger="src.data.decode"):
        stream_skips([shard], make_builder("conversations"))
    assert f"skipped a sample (bad_json): sample 'cat_42' of {shard}" in caplog.text


def test_writer_skip_messages_name_the_record_and_the_file(tmp_path, caplog):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(json.dumps({"id": "q17", "conversations": "hello"}) + "\n")
    records, _ = read_records(jsonl)
    with caplog.at_level(logging.WARNING, logger="src.data.decode"):
        write_shards(records, tmp_path, tmp_path / "out", source=str(jsonl))
    assert f"skipped a sample (bad_conversation): record 0 (id 'q17') of {jsonl}" in caplog.text


def test_the_inspector_counts_record_faults_by_the_streams_reasons(tmp_path, jpeg_bytes):
    shard = write_tar(tmp_path / "i.tar", [
        {"__key__": "a", "jpg": jpeg_bytes(), "json": json.dumps({"mc": 5}).encode()},
        {"__key__": "b", "jpg": jpeg_bytes(), "json": b'{"x": ' + DEEP + b"}"},
        {"__key__": "c", "gif": jpeg_bytes(fmt="GIF"), "json": json.dumps({"caption": "c"}).encode()},
    ])  # fmt: skip
    (tmp_path / "sizes.json").write_text("{broken")
    report = inspect_shards(str(shard))
    assert dict(report["corrupt"]) == {"bad_mc": 1, "too_deep": 1, "bad_image_format": 1}
    assert str(tmp_path / "sizes.json") in report["sizes_error"]


def test_image_bytes_fuzzed_at_random_never_escape(jpeg_bytes):
    """Cheap, deterministic companion to the hypothesis tests: every cut and flipped byte of each
    allowed format decodes or is a SampleError."""
    for fmt in ("JPEG", "PNG", "WEBP"):
        data = jpeg_bytes(fmt=fmt, size=(24, 16))
        for cut in range(0, len(data), max(1, len(data) // 40)):
            try:
                decode_image(data[:cut])
            except SampleError:
                pass
        for at in range(0, len(data), max(1, len(data) // 40)):
            flipped = bytearray(data)
            flipped[at] ^= 0xFF
            try:
                decode_image(bytes(flipped))
            except SampleError:
                pass


def test_image_formats_and_budget_are_data_config(tmp_path, jpeg_bytes, tokenizer, image_transform):
    record = {"conversations": GOOD_CHAT}
    shard = write_tar(tmp_path / "val-000000.tar", [
        {"__key__": "g", "gif": jpeg_bytes(fmt="GIF"), "json": json.dumps(record).encode()},
        {"__key__": "j", "jpg": jpeg_bytes(size=(64, 64)), "json": json.dumps(record).encode()},
    ])  # fmt: skip

    def skips(**options) -> dict[str, int]:
        dm = LlavaDataModule(val_shards=str(shard), eval_view="conversations", batch_size=2, num_workers=0,
                             system_prompt="", **options)  # fmt: skip
        dm.trainer = fake_trainer(tokenizer, image_transform)
        total: dict[str, int] = {}
        for batch in dm.val_dataloader():
            for reason, n in batch.get("skipped", {}).items():
                total[reason] = total.get(reason, 0) + n
        return total

    assert skips() == {"bad_image_format": 1}
    assert skips(image_formats=["JPEG", "GIF"]) == {}
    assert skips(image_formats=["JPEG", "GIF"], max_image_pixels=64 * 63) == {"too_many_pixels": 2}
    dm = LlavaDataModule(val_shards=str(shard), batch_size=2, num_workers=0, image_formats=["jpeg", "gif"],
                         max_image_pixels=64 * 63)  # fmt: skip
    assert dm.image_policy == ImagePolicy(("JPEG", "GIF"), 64 * 63)
    with pytest.raises(ValueError, match=r"unknown image formats \['HEIC'\]"):
        LlavaDataModule(val_shards=str(shard), image_formats=["HEIC"])
    with pytest.raises(ValueError, match="max image pixels must be a positive whole number, got 0"):
        LlavaDataModule(val_shards=str(shard), max_image_pixels=0)
    with pytest.raises(ValueError, match="unknown image formats"):
        LlavaDataModule(val_shards=str(shard), image_formats=[])
