"""src.data.datamodule: shard streaming, splitting over ranks/workers, batches, skips."""

from __future__ import annotations

import json
import math
import random
import re
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from src.data.conversation import IGNORE_INDEX
from src.data.datamodule import LlavaDataModule, ShardStream, collate, count_samples, expand_shards
from src.data.decode import decode_image, decode_sample
from src.data.samples import Example

pytestmark = pytest.mark.usefixtures("single_thread")

IMAGE_TOKENS = 16  # conftest's encoders: a 64 px image, 16 px patches -> 4x4 placeholders


# --- helpers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys_by_pixels(demo_dir, read_tar, image_transform):
    """Maps an image's transformed pixels to its sample key: identifies batch rows."""
    table = {}
    for shard in sorted(demo_dir.glob("*.tar")):
        for key, members in read_tar(shard):
            table[image_transform(decode_image(members["jpg"])).numpy().tobytes()] = key
    return table


def row_keys(batch: dict, table: dict) -> list[str]:
    return [table[p.numpy().tobytes()] for p in batch["pixel_values"]]


def records(read_tar, shards: list[str]) -> list[dict]:
    return [json.loads(members["json"]) for shard in shards for _, members in read_tar(shard)]


def image_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<image>")


def total_skips(batches: list[dict]) -> dict[str, int]:
    total: dict[str, int] = {}
    for batch in batches:
        for reason, n in batch["skipped"].items():
            total[reason] = total.get(reason, 0) + n
    return total


# --- shard lists and sizes -----------------------------------------------------------------


def test_expand_shards_expands_braces_and_lists():
    assert expand_shards("d/train-{000000..000003}.tar") == [f"d/train-00000{i}.tar" for i in range(4)]
    assert expand_shards(["a/{x,y}.tar", "b/z.tar"]) == ["a/x.tar", "a/y.tar", "b/z.tar"]
    assert expand_shards("s3://bucket/one.tar") == ["s3://bucket/one.tar"]
    assert expand_shards(("p-{8..10}.tar",)) == ["p-8.tar", "p-9.tar", "p-10.tar"]


def test_count_samples_reads_sizes_json(demo_dir, shards, tmp_path):
    assert count_samples(shards["train"]) == 40
    assert count_samples(shards["train"][:2] + shards["val"]) == 30
    assert count_samples(expand_shards(f"{demo_dir}/train-{{000000..000003}}.tar")) == 40
    assert count_samples([str(demo_dir / "train-000009.tar")]) is None  # not in sizes.json
    lone = tmp_path / "train-000000.tar"
    lone.write_bytes(Path(shards["train"][0]).read_bytes())
    assert count_samples([str(lone)]) is None  # no sizes.json beside it
    assert count_samples(shards["train"][:1] + [str(lone)]) is None
    (tmp_path / "sizes.json").write_text(json.dumps({"train-000000.tar": 7}))
    assert count_samples(shards["train"][:1] + [str(lone)]) == 17


# --- collate -------------------------------------------------------------------------------


def test_collate_pads_right_and_stacks_images_in_sample_order():
    def example(n: int, images: int | None, fill: float):
        pixels = None if images is None else torch.full((images, 3, 4, 4), fill)
        return Example(torch.arange(1, n + 1), torch.tensor([IGNORE_INDEX] * (n - 1) + [n]), pixels)

    examples = [example(3, 1, 1.0), example(5, None, 0.0), example(2, 2, 3.0)]
    batch = collate(examples, pad_id=99)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 99, 99], [1, 2, 3, 4, 5], [1, 2, 99, 99, 99]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, 3, IGNORE_INDEX, IGNORE_INDEX],
        [IGNORE_INDEX] * 4 + [5],
        [IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1, 1, 0, 0, 0]]
    assert torch.equal(batch["pixel_values"], torch.cat([examples[0].pixel_values, examples[2].pixel_values]))
    assert not {"mc_answer", "mc_candidates", "mc_type", "mc_format"} & set(batch)
    assert collate([example(2, None, 0.0)], pad_id=0)["pixel_values"] is None


def test_collate_carries_multiple_choice_fields_per_row():
    def example(mc):
        return Example(torch.tensor([1, 2, 3]), torch.tensor([IGNORE_INDEX, IGNORE_INDEX, 3]), None, mc)

    first = {"candidates": [[7, 2], [8, 2]], "answer": 1, "type": "colour", "format": "option"}
    second = {"candidates": [[9, 2], [10, 11, 2], [12, 2]], "answer": 2, "type": "count", "format": "option"}
    batch = collate([example(first), example(None), example(second)], pad_id=0)
    assert batch["mc_answer"].tolist() == [1, -1, 2] and batch["mc_answer"].dtype == torch.long
    assert batch["mc_candidates"] == [[[7, 2], [8, 2]], [], [[9, 2], [10, 11, 2], [12, 2]]]
    assert batch["mc_type"] == ["colour", "", "count"]
    assert batch["mc_format"] == "option"
    assert "mc_choice_ids" not in batch


# --- evaluation streams --------------------------------------------------------------------


def test_evaluation_reads_every_question_once(make_builder, shards, read_tar, tokenizer, keys_by_pixels):
    eval_shards = shards["val"] + shards["test"]
    expected = [(r["id"], mc["type"], mc["answer"]) for r in records(read_tar, eval_shards) for mc in r["mc"]]
    stream = ShardStream(eval_shards, make_builder("mc"), batch_size=7, pad_id=tokenizer.pad_token_id)
    batches = list(stream)
    got = [
        (key, kind, int(answer))
        for b in batches
        for key, kind, answer in zip(row_keys(b, keys_by_pixels), b["mc_type"], b["mc_answer"], strict=True)
    ]
    assert got == expected
    assert len(got) == sum(len(r["mc"]) for r in records(read_tar, eval_shards)) > 20
    assert len(batches) == math.ceil(len(expected) / 7)
    assert all(b["skipped"] == {} for b in batches)
    assert all(b["mc_format"] == "letter" for b in batches)
    assert list(stream) and len(list(stream)) == len(batches)  # an evaluation stream restarts


def test_batch_tensors_are_consistent(make_builder, shards, tokenizer):
    stream = ShardStream(shards["val"], make_builder("mc"), batch_size=6, pad_id=tokenizer.pad_token_id)
    letters = tokenizer.convert_tokens_to_ids(list("ABCD"))
    letter_replies = [[letter, tokenizer.eos_token_id] for letter in letters]
    for batch in stream:
        rows, length = batch["input_ids"].shape
        assert batch["labels"].shape == batch["attention_mask"].shape == (rows, length)
        assert batch["pixel_values"].shape == (rows, 3, 64, 64)  # one image per question
        assert int((batch["input_ids"] == image_id(tokenizer)).sum()) == rows * IMAGE_TOKENS
        lengths = batch["attention_mask"].sum(1)
        for row in range(rows):
            n = int(lengths[row])
            assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
            assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
            assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
            supervised = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
            assert supervised == [letters[int(batch["mc_answer"][row])], tokenizer.eos_token_id]
        assert batch["mc_candidates"] == [letter_replies] * rows
        assert batch["mc_answer"].shape == (rows,) and len(batch["mc_type"]) == rows
        assert batch["mc_format"] == "letter"


def test_option_format_batches_carry_each_rows_option_texts(make_builder, shards, read_tar, tokenizer):
    stream = ShardStream(shards["val"], make_builder("mc", mc_format="option"), batch_size=6, pad_id=0)
    batches = list(stream)
    questions = [mc for r in records(read_tar, shards["val"]) for mc in r["mc"]]
    candidates = [c for b in batches for c in b["mc_candidates"]]
    assert [[tokenizer.decode(ids) for ids in row] for row in candidates] == [
        [f"{option} </s>" for option in mc["options"]] for mc in questions
    ]
    assert [int(a) for b in batches for a in b["mc_answer"]] == [mc["answer"] for mc in questions]
    assert all(b["mc_format"] == "option" for b in batches)
    for batch in batches:  # each row supervises exactly its right candidate
        for row, options in enumerate(batch["mc_candidates"]):
            supervised = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
            assert supervised == options[int(batch["mc_answer"][row])]


def test_a_list_of_views_streams_every_view_of_each_sample(make_builder, shards, tokenizer, keys_by_pixels):
    views = ["conversations", "caption"]
    stream = ShardStream(shards["val"], make_builder(views), batch_size=3, pad_id=0)
    batches = list(stream)
    keys = [k for b in batches for k in row_keys(b, keys_by_pixels)]
    assert keys == [f"scene1_{i:06d}" for i in range(10) for _ in views]
    rows = [(b["input_ids"][r], b["labels"][r]) for b in batches for r in range(b["input_ids"].shape[0])]
    conversation_only = list(ShardStream(shards["val"], make_builder("conversations"), 1, 0))
    caption_only = list(ShardStream(shards["val"], make_builder("caption"), 1, 0))
    for i in range(10):
        for got, alone in ((rows[2 * i], conversation_only[i]), (rows[2 * i + 1], caption_only[i])):
            n = alone["input_ids"].shape[1]
            assert got[0][:n].tolist() == alone["input_ids"][0].tolist()
            assert (got[1][n:] == IGNORE_INDEX).all() and got[1][:n].tolist() == alone["labels"][0].tolist()


def test_batch_with_and_without_images(make_builder, tokenizer):
    builder = make_builder("conversations")
    with_image = builder(
        {
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the square?"},
                {"from": "gpt", "value": "red"},
            ]
        },
        [Image.new("RGB", (64, 64), (255, 0, 0))],
    )
    text_only = builder(
        {"conversations": [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": "two"}]}, []
    )
    batch = collate(with_image + text_only + with_image, tokenizer.pad_token_id)
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    assert (batch["input_ids"] == image_id(tokenizer)).sum(1).tolist() == [IMAGE_TOKENS, 0, IMAGE_TOKENS]


@pytest.mark.parametrize("world_size", [2, 3])
def test_evaluation_split_over_ranks_is_disjoint_and_complete(
    make_builder, shards, read_tar, tokenizer, keys_by_pixels, world_size
):
    eval_shards = shards["val"] + shards["test"]
    all_records = records(read_tar, eval_shards)
    seen: list[list[str]] = []
    for rank in range(world_size):
        stream = ShardStream(eval_shards, make_builder("mc"), batch_size=5, pad_id=0, rank=rank, world_size=world_size)
        keys = [k for b in stream for k in row_keys(b, keys_by_pixels)]
        expected = [r["id"] for r in all_records[rank::world_size] for _ in r["mc"]]
        assert keys == expected  # sample i goes to rank i % world_size, all its questions with it
        seen.append(keys)
    flat = [k for keys in seen for k in keys]
    assert sorted(set(flat)) == sorted(r["id"] for r in all_records)
    assert len(flat) == sum(len(r["mc"]) for r in all_records)


def test_evaluation_split_over_dataloader_workers(make_builder, shards, read_tar, keys_by_pixels):
    eval_shards = shards["val"] + shards["test"]
    all_records = records(read_tar, eval_shards)
    stream = ShardStream(eval_shards, make_builder("conversations"), batch_size=4, pad_id=0)
    loader = DataLoader(stream, batch_size=None, num_workers=2, multiprocessing_context="fork")
    keys = [k for b in loader for k in row_keys(b, keys_by_pixels)]
    assert sorted(keys) == sorted(r["id"] for r in all_records)


def test_evaluation_stream_has_no_length(make_builder, shards):
    with pytest.raises(TypeError, match="an evaluation stream has no known length"):
        len(ShardStream(shards["val"], make_builder("mc"), batch_size=4, pad_id=0))


def test_no_shards_is_an_error(make_builder):
    with pytest.raises(ValueError, match="no shards given"):
        ShardStream([], make_builder("mc"), batch_size=4, pad_id=0)


# --- training streams ----------------------------------------------------------------------


def training_stream(make_builder, shards, **options) -> ShardStream:
    defaults = dict(batch_size=4, pad_id=0, seed=0, shuffle_buffer=5, batches_per_epoch=3)
    return ShardStream(shards["train"], make_builder("conversations"), **(defaults | options))


def same_batches(a: list[dict], b: list[dict]) -> bool:
    keys = ("input_ids", "labels", "attention_mask", "pixel_values")
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in keys)


def test_training_epochs_have_fixed_length_and_continue(make_builder, shards):
    stream = training_stream(make_builder, shards)
    assert len(stream) == 3
    first, second = list(stream), list(stream)
    assert len(first) == len(second) == 3
    assert all(b["input_ids"].shape[0] == 4 for b in first + second)
    assert not same_batches(first, second)
    # two epochs of 3 are the first 6 batches of one uninterrupted stream
    assert same_batches(first + second, list(training_stream(make_builder, shards, batches_per_epoch=6)))
    # and the stream is reproducible from its seed
    assert same_batches(first, list(training_stream(make_builder, shards)))
    assert not same_batches(first, list(training_stream(make_builder, shards, seed=1)))


def test_training_passes_cover_each_rank_shards(make_builder, shards, keys_by_pixels):
    """Ranks read disjoint whole shards; each pass over a rank's shards sees every sample once."""
    passes = []
    for rank in (0, 1):
        # a window of 5 batches of 4 is one pass over the rank's 2 shards of 10 samples
        stream = training_stream(make_builder, shards, rank=rank, world_size=2, batches_per_epoch=5, window_batches=5)
        epochs = [[k for b in stream for k in row_keys(b, keys_by_pixels)] for _ in range(3)]
        assert all(len(keys) == len(set(keys)) == 20 for keys in epochs)  # 2 shards x 10 samples
        passes.append(epochs)
    first_pass = [set(passes[rank][0]) for rank in (0, 1)]
    assert not first_pass[0] & first_pass[1]
    assert first_pass[0] | first_pass[1] == {f"scene0_{i:06d}" for i in range(40)}
    shard_of = lambda key: int(key[-6:]) // 10  # noqa: E731
    for rank in (0, 1):
        for keys in passes[rank]:
            assert len({shard_of(k) for k in keys}) == 2  # whole shards, not a mix
    for epoch in range(3):  # every pass, the two ranks together read everything
        assert set(passes[0][epoch]) | set(passes[1][epoch]) == {f"scene0_{i:06d}" for i in range(40)}


def raw_order(make_builder, shards, keys_by_pixels, **options) -> list[str]:
    """Keys in stream order: batches of one example, windows of one batch, so nothing reorders."""
    options = dict(batch_size=1, batches_per_epoch=40, window_batches=1) | options
    return [k for b in training_stream(make_builder, shards, **options) for k in row_keys(b, keys_by_pixels)]


@pytest.mark.parametrize("shuffle_buffer", [0, -1])
def test_training_without_a_shuffle_buffer_reads_in_shard_order(make_builder, shards, keys_by_pixels, shuffle_buffer):
    stream = training_stream(
        make_builder, shards, shuffle_buffer=shuffle_buffer, batch_size=1, batches_per_epoch=40, window_batches=1
    )
    keys = [k for b in stream for k in row_keys(b, keys_by_pixels)]
    assert sorted(keys) == [f"scene0_{i:06d}" for i in range(40)]
    starts = [int(k[-6:]) for k in keys[::10]]  # whole shards, each in file order
    assert keys == [f"scene0_{start + i:06d}" for start in starts for i in range(10)]
    # the shard order is the seeded shuffle of pass 0 (source 0, seed 0)
    order = shards["train"][:]
    random.Random("0-0-0").shuffle(order)
    assert [f"scene0_{start:06d}" for start in starts] == [read_first_key(path) for path in order]
    # the next epoch goes on with the next pass, in the same way, in another order
    more = [k for b in stream for k in row_keys(b, keys_by_pixels)]
    order = shards["train"][:]
    random.Random("0-0-1").shuffle(order)
    assert more[::10] == [read_first_key(path) for path in order] != keys[::10]


def read_first_key(path: str) -> str:
    with tarfile.open(path) as tar:
        return tar.getmembers()[0].name.split(".", 1)[0]


def test_the_shuffle_buffer_shuffles_within_a_pass(make_builder, shards, keys_by_pixels):
    keys = raw_order(make_builder, shards, keys_by_pixels, shuffle_buffer=5)
    assert sorted(keys) == [f"scene0_{i:06d}" for i in range(40)]  # one pass, every sample once
    assert keys != raw_order(make_builder, shards, keys_by_pixels, shuffle_buffer=0)


def test_a_window_shuffles_examples_and_batches_them_whole(make_builder, shards, keys_by_pixels):
    """Window of 2 batches of 4: its 8 examples are the next 8 of the raw stream, reordered."""
    raw = raw_order(make_builder, shards, keys_by_pixels, batches_per_epoch=16)
    stream = training_stream(make_builder, shards, batch_size=4, batches_per_epoch=4, window_batches=2)
    batches = [row_keys(b, keys_by_pixels) for b in stream]
    assert all(len(b) == 4 for b in batches)
    for w in range(2):
        window = batches[2 * w] + batches[2 * w + 1]
        assert sorted(window) == sorted(raw[8 * w : 8 * w + 8])
    assert [k for b in batches for k in b] != raw[:16]


def test_too_few_shards_for_the_readers(make_builder, shards):
    stream = ShardStream(
        shards["val"], make_builder("conversations"), batch_size=2, pad_id=0, rank=1, world_size=2, batches_per_epoch=1
    )
    with pytest.raises(ValueError) as info:
        next(iter(stream))
    assert str(info.value) == (
        "1 training shards cannot feed 2 readers (ranks x workers); "
        "write more, smaller shards, use fewer dataloader workers, or resample shards"
    )


def test_blank_images_make_every_pixel_tensor_identical(make_builder, shards):
    grey = torch.full((3, 64, 64), (128 / 255 - 0.5) / 0.5)
    blank = [
        b["pixel_values"] for b in ShardStream(shards["val"], make_builder("conversations", blank_images=True), 4, 0)
    ]
    pixels = torch.cat(blank)
    assert pixels.shape[0] == 10
    assert all(torch.equal(p, pixels[0]) for p in pixels)
    torch.testing.assert_close(pixels[0], grey)
    real = torch.cat([b["pixel_values"] for b in ShardStream(shards["val"], make_builder("conversations"), 4, 0)])
    assert len({p.numpy().tobytes() for p in real}) == 10


# --- broken data ---------------------------------------------------------------------------


def write_tar(path: Path, samples: list[dict]) -> None:
    with open(path, "wb") as stream, wds.TarWriter(stream, encoder=False) as writer:
        for sample in samples:
            writer.write(sample)


def truncated_copy(source: Path, target: Path, cut_in: str, header: bool = False) -> None:
    """`source` cut inside the data of member `cut_in` (or at the start of its header)."""
    with tarfile.open(source) as tar:
        member = tar.getmember(cut_in)
    data = source.read_bytes()
    cut = member.offset if header else member.offset_data + member.size // 2
    assert 0 < cut < len(data)
    target.write_bytes(data[:cut])


@pytest.fixture
def broken_shards(tmp_path, demo_dir, read_tar):
    samples = read_tar(demo_dir / "val-000000.tar")
    (_good_key, good), (_, other) = samples[0], samples[1]
    record = json.loads(other["json"])
    two_tags = dict(
        record, conversations=[{"from": "human", "value": "<image>\n<image>\nWhat?"}, {"from": "gpt", "value": "red"}]
    )
    bad = tmp_path / "bad-000000.tar"
    write_tar(bad, [
        {"__key__": "good", "jpg": good["jpg"], "json": good["json"]},
        {"__key__": "badimage", "jpg": b"\xff\xd8\xff\xe0 definitely not a jpeg", "json": other["json"]},
        {"__key__": "badjson", "jpg": other["jpg"], "json": b'{"conversations": [{"from": "hu'},
        {"__key__": "empty", "jpg": other["jpg"], "json": json.dumps(dict(record, conversations=[])).encode()},
        {"__key__": "twotags", "jpg": other["jpg"], "json": json.dumps(two_tags).encode()},
    ])  # fmt: skip
    whole = tmp_path / "whole.tar"
    write_tar(whole, [{"__key__": f"t{i}", "jpg": m["jpg"], "json": m["json"]} for i, (_, m) in enumerate(samples[:3])])
    cut = tmp_path / "cut-000000.tar"
    truncated_copy(whole, cut, "t1.json")  # t0 whole, t1 loses its json mid-way, t2 is gone
    sizes = {"bad-000000.tar": 5, "whole.tar": 3, "cut-000000.tar": 3}
    (tmp_path / "sizes.json").write_text(json.dumps(sizes))  # what the shards held when written
    return SimpleNamespace(bad=bad, cut=cut, whole=whole, good=good, samples=samples, dir=tmp_path, sizes=sizes)


def test_broken_samples_are_skipped_and_counted(broken_shards, make_builder, tokenizer, keys_by_pixels):
    builder = make_builder("conversations")
    stream = ShardStream([str(broken_shards.bad), str(broken_shards.cut)], builder, batch_size=8, pad_id=0)
    batches = list(stream)
    assert len(batches) == 1
    keys = row_keys(batches[0], keys_by_pixels)
    assert keys == ["scene1_000000", "scene1_000000"]  # 'good', then t0 of the cut shard (the same scene)
    (expected,) = builder(*decode_sample(broken_shards.good))
    n = len(expected.input_ids)
    assert batches[0]["input_ids"][0, :n].tolist() == expected.input_ids.tolist()
    # A shard cut inside a member's data: tarfile fails once reading the member and once
    # more moving to the next header (both reported as bad_shard); the sample whose json
    # was cut comes out with its image only, so the conversations view counts it missing;
    # t2 never comes out: sizes.json says 3 samples, the shard yields 2.
    assert total_skips(batches) == {
        "bad_image": 1,
        "bad_json": 1,
        "empty_conversation": 1,
        "image_tag_mismatch": 1,
        "bad_shard": 2,
        "missing_field": 1,
        "missing_in_shard": 1,
    }
    assert dict(stream.skips.total) == total_skips(batches)


def test_unreadable_shard_is_counted_and_the_rest_streams(broken_shards, make_builder, tmp_path):
    garbage = tmp_path / "garbage-000000.tar"
    garbage.write_bytes(b"not a tar archive at all " * 100)
    stream = ShardStream(
        [str(garbage), str(broken_shards.whole)], make_builder("conversations"), batch_size=8, pad_id=0
    )
    batches = list(stream)
    assert sum(b["input_ids"].shape[0] for b in batches) == 3
    assert total_skips(batches) == {"bad_shard": 1}  # not in sizes.json: its samples are unknown


def test_missing_shard_stops_start_up(broken_shards, make_builder, tmp_path):
    missing = tmp_path / "missing-000000.tar"
    with pytest.raises(FileNotFoundError) as info:
        ShardStream([str(broken_shards.whole), str(missing)], make_builder("conversations"), batch_size=8, pad_id=0)
    assert str(info.value) == f"shards: {missing} does not exist; 1 of the 2 shards are missing"


def test_shard_vanished_after_start_up_counts_its_samples_missing(broken_shards, make_builder):
    lost = broken_shards.dir / "lost-000000.tar"
    lost.write_bytes(broken_shards.whole.read_bytes())
    (broken_shards.dir / "sizes.json").write_text(json.dumps(broken_shards.sizes | {"lost-000000.tar": 4}))
    stream = ShardStream([str(lost), str(broken_shards.whole)], make_builder("conversations"), 8, 0)
    lost.unlink()  # deleted (or its disk gone) once the run has started
    batches = list(stream)
    assert sum(b["input_ids"].shape[0] for b in batches) == 3
    assert total_skips(batches) == {"bad_shard": 1, "missing_in_shard": 4}


def test_whole_shards_and_extra_samples_count_nothing_missing(broken_shards, make_builder):
    (broken_shards.dir / "sizes.json").write_text(json.dumps({"whole.tar": 2}))  # fewer than it holds
    batches = list(ShardStream([str(broken_shards.whole)], make_builder("conversations"), 2, 0))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    assert total_skips(batches) == {}


@pytest.mark.parametrize(("cut_at", "kept"), [("t2.jpg", 2), ("t1.jpg", 1)])
def test_shard_cut_at_a_header_boundary_counts_the_lost_samples(
    broken_shards, make_builder, keys_by_pixels, cut_at, kept
):
    """tarfile reads a tar cut at a header boundary as a whole, shorter one: only sizes.json tells."""
    cut = broken_shards.dir / "cut-at-header.tar"
    truncated_copy(broken_shards.whole, cut, cut_at, header=True)
    (broken_shards.dir / "sizes.json").write_text(json.dumps(broken_shards.sizes | {"cut-at-header.tar": 3}))
    stream = ShardStream([str(cut)], make_builder("conversations"), batch_size=8, pad_id=0)
    batches = list(stream)
    assert len(batches) == 1
    assert row_keys(batches[0], keys_by_pixels) == [f"scene1_{i:06d}" for i in range(kept)]  # t0.. of val
    assert total_skips(batches) == {"missing_in_shard": 3 - kept}  # exactly the lost samples, no bad_shard
    assert dict(stream.skips.total) == {"missing_in_shard": 3 - kept}


def test_shard_cut_at_a_header_boundary_without_sizes_goes_unnoticed(broken_shards, make_builder):
    """Documents the limit: with no size on record, a header-boundary cut cannot be told apart."""
    cut = broken_shards.dir / "cut-at-header.tar"
    truncated_copy(broken_shards.whole, cut, "t2.jpg", header=True)  # not in the fixture's sizes.json
    batches = list(ShardStream([str(cut)], make_builder("conversations"), batch_size=8, pad_id=0))
    assert sum(b["input_ids"].shape[0] for b in batches) == 2
    assert total_skips(batches) == {}


@pytest.mark.parametrize("world_size", [2, 3])
def test_missing_samples_are_reported_once_over_evaluation_ranks(broken_shards, make_builder, world_size):
    cut = broken_shards.dir / "cut-at-header.tar"
    truncated_copy(broken_shards.whole, cut, "t1.jpg", header=True)  # t0 whole, t1 and t2 gone
    (broken_shards.dir / "sizes.json").write_text(json.dumps(broken_shards.sizes | {"cut-at-header.tar": 3}))
    counts = []
    for rank in range(world_size):
        stream = ShardStream(
            [str(cut), str(broken_shards.whole)], make_builder("conversations"), batch_size=8, pad_id=0,
            rank=rank, world_size=world_size,
        )  # fmt: skip
        batches = list(stream)
        assert batches  # every rank has a sample of the whole shard to carry its counts
        counts.append(total_skips(batches))
    assert counts[0] == {"missing_in_shard": 2}
    assert all(c == {} for c in counts[1:])  # every rank reads the shard; only rank 0 reports it


def test_skips_after_the_last_batch_ride_on_the_final_batch(broken_shards, make_builder):
    stream = ShardStream([str(broken_shards.bad)], make_builder("conversations"), batch_size=1, pad_id=0)
    batches = list(stream)
    everything = {"bad_image": 1, "bad_json": 1, "empty_conversation": 1, "image_tag_mismatch": 1}
    assert len(batches) == 1 and batches[0]["input_ids"].shape[0] == 1  # 'good' is the only usable sample
    assert batches[0]["skipped"] == everything
    assert dict(stream.skips.total) == everything
    assert stream.skips.take() == {}  # nothing is left behind in the counter


def test_each_skip_rides_on_the_next_batch_to_leave(tmp_path, broken_shards, make_builder, keys_by_pixels):
    members = {key: m for key, m in read_members(broken_shards.bad)}
    good, other = members["good"], broken_shards.samples[1][1]
    shard = tmp_path / "mixed.tar"
    write_tar(shard, [
        {"__key__": "a", **good},
        {"__key__": "b", "jpg": b"not a jpeg", "json": good["json"]},
        {"__key__": "c", **other},
        {"__key__": "d", "jpg": other["jpg"], "json": b"{"},
        {"__key__": "e", "jpg": other["jpg"], "json": b"{"},
        {"__key__": "f", **good},
        {"__key__": "g", "jpg": b"x", "json": good["json"]},
    ])  # fmt: skip
    stream = ShardStream([str(shard)], make_builder("conversations"), batch_size=1, pad_id=0)
    batches = list(stream)
    assert [row_keys(b, keys_by_pixels) for b in batches] == [["scene1_000000"], ["scene1_000001"], ["scene1_000000"]]
    # a batch leaves once the next example exists: it carries the skips read on the way to it
    assert [b["skipped"] for b in batches] == [{"bad_image": 1}, {"bad_json": 2}, {"bad_image": 1}]


def read_members(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, suffix = member.name.split(".", 1)
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][suffix] = tar.extractfile(member).read()
    return out


def test_training_batches_carry_the_skips(broken_shards, make_builder):
    stream = ShardStream(
        [str(broken_shards.bad)], make_builder("conversations"), batch_size=1, pad_id=0, batches_per_epoch=3,
        window_batches=1,
    )  # fmt: skip
    batches = list(stream)
    assert len(batches) == 3
    # each pass: 'good' (one batch), then four broken samples, counted with the next batch
    assert batches[0]["skipped"] == {}
    assert batches[1]["skipped"] == {"bad_image": 1, "bad_json": 1, "empty_conversation": 1, "image_tag_mismatch": 1}
    assert batches[2]["skipped"] == batches[1]["skipped"]


def test_a_reader_with_no_usable_sample_still_reports_its_skips(broken_shards, make_builder):
    stream = ShardStream([str(broken_shards.bad)], make_builder("conversations"), batch_size=4, pad_id=0, rank=1,
                         world_size=2)  # fmt: skip
    batches = list(stream)  # rank 1 reads samples 1 and 3: 'badimage' and 'empty'
    assert dict(stream.skips.total) == {"bad_image": 1, "empty_conversation": 1}  # holds today
    assert total_skips(batches) == dict(stream.skips.total)  # fails today: no batch, so they never leave


def test_a_shard_error_is_reported_once_over_evaluation_workers(broken_shards, make_builder, tmp_path):
    garbage = tmp_path / "garbage-000000.tar"
    garbage.write_bytes(b"not a tar archive at all " * 100)
    stream = ShardStream(
        [str(garbage), str(broken_shards.whole)], make_builder("conversations"), batch_size=1, pad_id=0
    )
    loader = DataLoader(stream, batch_size=None, num_workers=2, multiprocessing_context="fork")
    batches = list(loader)
    assert sum(b["input_ids"].shape[0] for b in batches) == 3  # holds today: every sample once
    assert total_skips(batches) == {"bad_shard": 1}  # fails today: {'bad_shard': 2}


# --- the Lightning data module -------------------------------------------------------------


def fake_trainer(tokenizer, image_transform, rank=0, world=1):
    spec = {"tokenizer": tokenizer, "image_transform": image_transform, "image_tokens": IMAGE_TOKENS}
    alone = SimpleNamespace(root_device="cpu", reduce=lambda tensor, reduce_op: tensor)  # the other ranks agree
    return SimpleNamespace(
        lightning_module=SimpleNamespace(data_spec=lambda: spec), global_rank=rank, world_size=world, strategy=alone
    )


class OtherRank:
    """A strategy whose reduce adds another rank's answer: it has `batches` evaluation batches."""

    root_device = "cpu"

    def __init__(self, batches: int) -> None:
        self.left = batches

    def reduce(self, tensor, reduce_op):
        assert reduce_op == "sum"
        has = float(self.left > 0)
        self.left -= 1
        return tensor + has


def test_lockstep_batches_fill_in_for_a_rank_with_fewer():
    from src.data.datamodule import LockstepBatches

    mine = [{"input_ids": 1}, {"skipped": {"bad_image": 2}, "empty": True}]
    got = list(LockstepBatches(mine, OtherRank(4)))
    assert got == [
        {"input_ids": 1},
        {"input_ids": 1, "filler": True, "skipped": {"bad_image": 2}},  # an empty batch: its skips go on
        {"input_ids": 1, "filler": True},
        {"input_ids": 1, "filler": True},
    ]
    assert list(LockstepBatches([{"input_ids": 1}, {"input_ids": 2}], OtherRank(1))) == [
        {"input_ids": 1},
        {"input_ids": 2},
    ]
    with pytest.raises(RuntimeError, match="this rank read no evaluation example while others still evaluate"):
        list(LockstepBatches([], OtherRank(1)))


def test_datamodule_loaders(demo_dir, tokenizer, image_transform, keys_by_pixels):
    dm = LlavaDataModule(
        train_shards=f"{demo_dir}/train-{{000000..000003}}.tar",
        val_shards=f"{demo_dir}/val-000000.tar",
        test_shards=[f"{demo_dir}/test-000000.tar"],
        batch_size=4,
        eval_batch_size=16,
        num_workers=0,
        shuffle_buffer=3,
        system_prompt="",
    )
    dm.trainer = fake_trainer(tokenizer, image_transform, rank=1, world=2)
    train = dm.train_dataloader()
    assert train.dataset.batches_per_epoch == 40 // (4 * 2)
    assert (train.dataset.rank, train.dataset.world_size) == (1, 2)
    assert len(list(train)) == 5
    val = list(dm.val_dataloader())
    assert val[0]["input_ids"].shape[0] <= 16
    assert {k for b in val for k in row_keys(b, keys_by_pixels)} == {f"scene1_{i:06d}" for i in range(1, 10, 2)}
    test = list(dm.test_dataloader())
    assert {k for b in test for k in row_keys(b, keys_by_pixels)} == {f"scene2_{i:06d}" for i in range(1, 10, 2)}


def test_the_spec_reaches_the_datamodule_as_a_value_a_source_or_the_trainer_s_module(
    demo_dir, tokenizer, image_transform
):
    """No model in sight: the tokenizer and transform handed over as values make the same batches as
    the Trainer's module would; a source is asked once; without any, a clear error."""
    from src.data.spec import DataSpec

    def datamodule() -> LlavaDataModule:
        return LlavaDataModule(val_shards=f"{demo_dir}/val-000000.tar", num_workers=0, system_prompt="")

    given = datamodule()
    with pytest.raises(RuntimeError, match="LlavaDataModule needs a DataSpec .* set datamodule.spec or"):
        given.val_dataloader()
    given.spec = DataSpec(tokenizer, image_transform, IMAGE_TOKENS)
    by_value = list(given.val_dataloader())
    under_trainer = datamodule()
    under_trainer.trainer = fake_trainer(tokenizer, image_transform)
    by_module = list(under_trainer.val_dataloader())
    assert isinstance(under_trainer.spec, DataSpec)  # the module's dict, as a spec
    assert len(by_value) == len(by_module) > 0
    for a, b in zip(by_value, by_module, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    assert given.pad_id() == tokenizer.pad_token_id
    prompts = given.example_builder("prompt")
    assert prompts.encoder.tokenizer is tokenizer and prompts.views == ["prompt"]

    asked = []
    source = SimpleNamespace(data_spec=lambda: asked.append(1) or DataSpec(tokenizer, image_transform, IMAGE_TOKENS))
    sourced = datamodule()
    sourced.spec_source = source
    sourced.val_dataloader(), sourced.val_dataloader()
    assert asked == [1]

    no_spec = datamodule()
    no_spec.trainer = SimpleNamespace(lightning_module=SimpleNamespace(), global_rank=0, world_size=1)
    with pytest.raises(RuntimeError, match="whose LightningModule has data_spec"):
        no_spec.val_dataloader()


def test_datamodule_reads_a_list_of_training_views(demo_dir, tokenizer, image_transform, keys_by_pixels):
    dm = LlavaDataModule(
        train_shards=f"{demo_dir}/train-000000.tar", train_view=["conversations", "caption"], batch_size=4,
        num_workers=0, shuffle_buffer=0, samples_per_epoch=20, system_prompt="", window_batches=1,
    )  # fmt: skip
    dm.trainer = fake_trainer(tokenizer, image_transform)
    train = dm.train_dataloader()
    assert train.dataset.builder.views == ["conversations", "caption"]
    batches = list(train)
    assert len(batches) == 10  # 20 samples read two ways are 40 examples: 10 batches of 4
    captions = {k: json.loads(m["json"])["caption"] for k, m in read_members(demo_dir / "train-000000.tar")}
    seen: dict[str, list[str]] = {}
    for b in batches[:5]:  # windows of one batch: samples 0-1, 2-3, ... each read both ways
        for row, key in enumerate(row_keys(b, keys_by_pixels)):
            labels = b["labels"][row]
            expected = tokenizer(" " + captions[key], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            seen.setdefault(key, []).append(
                "caption" if labels[labels != IGNORE_INDEX].tolist() == expected else "chat"
            )
    assert sorted(seen) == [f"scene0_{i:06d}" for i in range(10)]
    assert all(sorted(ways) == ["caption", "chat"] for ways in seen.values())


def test_default_epoch_with_two_views_covers_every_sample_once(demo_dir, tokenizer, image_transform, keys_by_pixels):
    dm = LlavaDataModule(
        train_shards=f"{demo_dir}/train-{{000000..000003}}.tar", train_view=["conversations", "caption"],
        batch_size=4, num_workers=0, shuffle_buffer=0,
    )  # fmt: skip
    dm.trainer = fake_trainer(tokenizer, image_transform)
    keys = [k for b in dm.train_dataloader() for k in row_keys(b, keys_by_pixels)]
    assert len(set(keys)) == 40  # fails today: 10 batches of 4 = 40 examples = 20 samples read twice


def test_datamodule_needs_sizes_or_samples_per_epoch(tmp_path, shards, tokenizer, image_transform):
    lone = tmp_path / "train-000000.tar"
    lone.write_bytes(Path(shards["train"][0]).read_bytes())
    dm = LlavaDataModule(train_shards=str(lone), num_workers=0)
    dm.trainer = fake_trainer(tokenizer, image_transform)
    with pytest.raises(ValueError, match="set data.samples_per_epoch"):
        dm.train_dataloader()
    dm = LlavaDataModule(train_shards=str(lone), num_workers=0, samples_per_epoch=12, batch_size=5)
    dm.trainer = fake_trainer(tokenizer, image_transform)
    assert dm.train_dataloader().dataset.batches_per_epoch == 2
    with pytest.raises(ValueError, match=re.escape("data.val_shards is not set")):
        dm.val_dataloader()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"train_view": "chat"}, "unknown view 'chat'"),
        ({"train_view": ["caption", "chat"]}, "unknown view 'chat'"),
        ({"eval_view": "MC"}, "unknown view 'MC'"),
        ({"template": "vicuna"}, "unknown conversation template 'vicuna'"),
        ({"mc_format": "free"}, "unknown multiple-choice format 'free'"),
    ],
)
def test_datamodule_rejects_bad_options_at_construction(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LlavaDataModule(**options)


def test_datamodule_rejects_unknown_names_at_construction():
    with pytest.raises(ValueError, match=r"unknown image_position 'middle'; choose one of \['first', 'last'\]"):
        LlavaDataModule(image_position="middle")
    with pytest.raises(ValueError, match=r"unknown view 'chat'"):
        LlavaDataModule(train_view=["caption", "chat"])
    with pytest.raises(ValueError, match="unknown multiple-choice format 'letters'"):
        LlavaDataModule(mc_format="letters")


@pytest.mark.parametrize(("world", "accumulate"), [(1, 8), (2, 4), (8, 1)])
def test_global_batch_size_sets_accumulation_for_the_cluster(world, accumulate):
    dm = LlavaDataModule(batch_size=4, global_batch_size=32)
    dm.trainer = SimpleNamespace(world_size=world, accumulate_grad_batches=1)
    dm.setup("fit")
    assert dm.trainer.accumulate_grad_batches == accumulate


def test_global_batch_size_must_divide_and_not_conflict():
    dm = LlavaDataModule(batch_size=4, global_batch_size=36)
    dm.trainer = SimpleNamespace(world_size=2, accumulate_grad_batches=1)
    with pytest.raises(ValueError, match=r"global_batch_size 36 is not a multiple of data.batch_size 4 x 2 processes"):
        dm.setup("fit")
    dm = LlavaDataModule(batch_size=4, global_batch_size=32)
    dm.trainer = SimpleNamespace(world_size=2, accumulate_grad_batches=2)
    with pytest.raises(ValueError, match="trainer.accumulate_grad_batches 2 conflicts with data.global_batch_size"):
        dm.setup("fit")
