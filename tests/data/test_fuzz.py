"""Property tests (hypothesis) of the data layer: past start-up, nothing a shard or a JSON input holds
makes the stream or the shard writer raise. Every sample read is an example or one counted skip,
and the counts add up to the samples read.

Bounded for CI: few examples each (`FUZZ_EXAMPLES` raises it for a longer local hunt), no deadline,
derandomized so a failure reproduces; the whole file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import tarfile
import tempfile
import zlib
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from src.data.conversation import ConversationEncoder, build_template
from src.data.inputs import read_records
from src.data.samples import PROMPT_VIEW, ExampleBuilder
from src.data.shards import write_shards
from src.data.stream import ShardStream

pytestmark = pytest.mark.usefixtures("single_thread", "quiet_skips")

FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "80")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
IMAGE_TOKENS = 16
VIEWS = ("conversations", "caption", "mc", PROMPT_VIEW)


@pytest.fixture(scope="module")
def quiet_skips():
    """Thousands of skips are the point here: their log lines would only bury a failure."""
    logger = logging.getLogger("src.data.decode")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


# --- what a shard can hold -------------------------------------------------------------------


def _encoded(fmt: str, size=(8, 6), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 90).save(buffer, format=fmt)
    return buffer.getvalue()


def _png_bomb() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 12_000, 12_000, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@cache
def image_pool() -> dict[str, bytes]:
    jpeg = _encoded("JPEG", (40, 30))
    return {
        "jpeg": jpeg,
        "png": _encoded("PNG", mode="RGBA"),
        "grey_png": _encoded("PNG", mode="L"),
        "palette_png": _encoded("PNG", mode="P"),
        "webp": _encoded("WEBP"),
        "gif": _encoded("GIF"),
        "bmp": _encoded("BMP"),
        "tiff": _encoded("TIFF"),
        "truncated": jpeg[: len(jpeg) // 2],
        "bomb": _png_bomb(),
        "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
        "empty": b"",
        "zero_size_header": _encoded("PNG")[:16] + b"\0" * 8,
    }


texts = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["<image>", "<image>\nWhat is it?", "<image> <image>", "</s>", "USER:", " ", "A red square.", "\ud800"]
)
json_leaves = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | texts
json_values = st.recursive(
    json_leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3), max_leaves=8
)
roles = st.sampled_from(["human", "gpt", "user", "assistant", "system"]) | json_leaves
messages = st.fixed_dictionaries({}, optional={"from": roles, "value": texts | json_leaves}) | json_values
conversations = st.lists(messages, max_size=5) | st.just(
    [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]
)
questions = st.fixed_dictionaries(
    {},
    optional={
        "question": texts | json_leaves,
        "options": st.lists(texts, max_size=9) | json_values,
        "answer": st.integers(-2, 9) | json_leaves,
        "type": texts | st.lists(texts, max_size=2) | json_leaves,
    },
)
image_fields = st.sampled_from(["a.jpg", "gif.gif", "nope.jpg", "/abs.jpg", "../up.jpg", ""]) | json_values
records = (
    st.fixed_dictionaries(
        {},
        optional={
            "id": json_leaves,
            "conversations": conversations | json_values,
            "caption": texts | json_leaves,
            "mc": st.lists(questions | json_values, max_size=3) | json_values,
            "image": image_fields | st.lists(image_fields, max_size=3),
            "images": st.lists(image_fields, max_size=3),
        },
    )
    | json_values
)

json_members = (
    records.map(lambda r: json.dumps(r).encode("utf-8", "surrogatepass"))
    | st.sampled_from([b"[" * 1000 + b"]" * 1000, b'{"conversations": ' + b"[" * 40 + b"]" * 40 + b"}", b"{", b""])
    | st.binary(max_size=40)
)
image_members = st.sampled_from(sorted(image_pool())).map(lambda name: image_pool()[name]) | st.binary(max_size=40)
member_names = st.sampled_from(["jpg", "png", "webp", "0.jpg", "1.png", "gif", "bmp", "jpeg", "2.webp", "eps"])
other_names = st.sampled_from(["txt", "pyd", "pth", "npy", "cls", "json.gz", "__weird"])


@st.composite
def raw_samples(draw) -> dict[str, bytes]:
    """One sample as a tar would group it: member suffix -> bytes."""
    sample: dict[str, bytes] = {}
    if draw(st.booleans()):
        sample["json"] = draw(json_members)
    for name in draw(st.lists(member_names, max_size=3, unique=True)):
        sample[name] = draw(image_members)
    for name in draw(st.lists(other_names, max_size=2, unique=True)):
        sample[name] = draw(st.binary(max_size=30) | st.sampled_from([b"A caption.", "\xe9".encode("latin-1")]))
    return sample


GOOD = {
    "jpg": None,  # filled with the pool's JPEG
    "json": json.dumps({
        "caption": "A grey square.",
        "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Grey."}],
        "mc": [{"question": "Which colour?", "options": ["grey", "red"], "answer": 0}],
    }).encode(),
}  # fmt: skip


@st.composite
def tar_layouts(draw) -> dict:
    """Samples, how their members are laid out in the tar, and whether the tar is cut short."""
    samples = draw(st.lists(raw_samples(), min_size=0, max_size=6))
    if draw(st.booleans()):
        samples.insert(draw(st.integers(0, len(samples))), dict(GOOD, jpg=image_pool()["jpeg"]))
    return {
        "samples": samples,
        "interleave": draw(st.booleans()),  # members of neighbouring samples mixed: webdataset splits them
        "dotted_keys": draw(st.booleans()),  # a dot in a key: webdataset groups by what precedes it
        "cut": draw(st.none() | st.floats(0.05, 0.99)),
        "garbage": draw(st.booleans()) and draw(st.booleans()),  # a second "shard" that is no tar
    }


def write_layout(layout: dict, folder: Path) -> list[str]:
    members = []
    for index, sample in enumerate(layout["samples"]):
        key = f"s{index}.v" if layout["dotted_keys"] and index % 2 else f"s{index}"
        members.append([(f"{key}.{suffix}", data) for suffix, data in sample.items()])
    flat = [m for sample in members for m in sample]
    if layout["interleave"] and len(members) > 1:
        flat = [m for pair in zip(*members[:2], strict=False) for m in pair] + [
            m for sample in members[2:] for m in sample
        ]
    shard = folder / "fuzz-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in flat:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if layout["cut"] is not None:
        data = shard.read_bytes()
        shard.write_bytes(data[: int(len(data) * layout["cut"])])
    shards = [str(shard)]
    if layout["garbage"]:
        (folder / "garbage-000000.tar").write_bytes(b"no tar here" * 60)
        shards.append(str(folder / "garbage-000000.tar"))
    return shards


# --- the stream ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builders(tokenizer, image_transform) -> dict[str, ExampleBuilder]:
    encoder = ConversationEncoder(tokenizer, build_template("vicuna_v1", ""), image_tokens=IMAGE_TOKENS, max_length=200)
    return {view: ExampleBuilder(encoder, image_transform, view) for view in VIEWS}


class CountingStream(ShardStream):
    """Records, per raw sample read, how many examples it gave and how many skips it added."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reads: list[tuple[int, int]] = []

    def _read(self, raw, builder, draft=False):
        before = sum(self.skips.total.values())
        examples = super()._read(raw, builder, draft)
        self.reads.append((len(examples), sum(self.skips.total.values()) - before))
        return examples


@FUZZ
@given(layout=tar_layouts(), view=st.sampled_from(VIEWS))
def test_evaluation_stream_counts_every_sample(builders, layout, view):
    with tempfile.TemporaryDirectory() as folder:
        shards = write_layout(layout, Path(folder))
        stream = CountingStream(shards, builders[view], batch_size=3, pad_id=0)
        batches = list(stream)  # never raises
    for examples, skips in stream.reads:
        assert (examples > 0 and skips == 0) or (examples == 0 and skips == 1)  # an example, or one counted skip
    event(f"a sample became an example: {any(e for e, _ in stream.reads)}")
    for reason in stream.skips.total:
        event(f"skip: {reason}")
    assert sum(b["input_ids"].shape[0] for b in batches if "input_ids" in b) == sum(e for e, _ in stream.reads)
    skipped: dict[str, int] = {}
    for batch in batches:
        for reason, n in batch["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert skipped == dict(stream.skips.total)  # every skip reaches the training process
    per_sample = sum(s for _, s in stream.reads)
    per_shard = skipped.get("bad_shard", 0) + skipped.get("missing_in_shard", 0)
    assert sum(skipped.values()) == per_sample + per_shard
    whole = layout["cut"] is None and not layout["interleave"] and not layout["dotted_keys"]
    if whole:  # a well-formed tar: every sample written is read, and is an example or a skip
        assert len(stream.reads) == len([s for s in layout["samples"] if s])
        assert per_shard == (1 if layout["garbage"] else 0)


@FUZZ
@given(layout=tar_layouts(), view=st.sampled_from(VIEWS[:3]), batching=st.sampled_from(["shuffle", "pack"]))
def test_training_stream_never_raises_while_a_sample_is_usable(builders, layout, view, batching):
    with tempfile.TemporaryDirectory() as folder:
        good = Path(folder) / "good"
        good.mkdir()
        shards = write_layout(layout, Path(folder))
        shards += write_layout(dict(samples=[dict(GOOD, jpg=image_pool()["jpeg"])], interleave=False,
                                    dotted_keys=False, cut=None, garbage=False), good)  # fmt: skip
        stream = CountingStream(
            shards, builders[view], batch_size=2, pad_id=0, batches_per_epoch=2, window_batches=1,
            shuffle_buffer=2, batching=batching, pack_length=400, seed=3,
        )  # fmt: skip
        batches = list(stream)  # draft decoding, windows, packing: never raises
    assert len(batches) == 2
    for examples, skips in stream.reads:
        assert (examples > 0 and skips == 0) or (examples == 0 and skips == 1)


# --- the shard writer ------------------------------------------------------------------------


@cache
def image_folder() -> Path:
    root = Path(tempfile.mkdtemp(prefix="fuzz-images-"))
    pool = image_pool()
    for name, data in [("a.jpg", pool["jpeg"]), ("gif.gif", pool["gif"]), ("bomb.png", pool["bomb"]),
                       ("eps.jpg", pool["eps"]), ("bad.jpg", pool["truncated"]), ("b.webp", pool["webp"])]:  # fmt: skip
        (root / name).write_bytes(data)
    (root / "dir.jpg").mkdir()
    return root


writer_paths = st.sampled_from(["a.jpg", "gif.gif", "bomb.png", "eps.jpg", "bad.jpg", "b.webp", "dir.jpg", "nope.jpg"])
writer_records = records | st.builds(
    lambda paths, question, answer, extra: {
        "id": "r",
        "image": paths[0] if len(paths) == 1 else paths,
        "conversations": [
            {"from": "human", "value": "<image>\n" * len(paths) + question},
            {"from": "gpt", "value": answer},
        ],
        **extra,
    },
    st.lists(writer_paths, min_size=1, max_size=2),
    texts,
    texts,
    st.fixed_dictionaries({}, optional={"mc": st.lists(questions, max_size=2), "caption": texts | json_leaves}),
)


def assert_written_shards_read(out: Path, builder: ExampleBuilder, written: int) -> None:
    """What the writer wrote, the stream reads: no sample of it is skipped (but as too long)."""
    shards = sorted(str(p) for p in out.glob("*.tar"))
    if not shards:
        assert written == 0
        return
    stream = CountingStream(shards, builder, batch_size=4, pad_id=0)
    list(stream)
    assert len(stream.reads) == written
    assert set(stream.skips.total) <= {"too_long"}, dict(stream.skips.total)


@FUZZ
@given(items=st.lists(writer_records, max_size=6))
def test_shards_write_counts_every_record_and_what_it_writes_reads(builders, items):
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "out"
        summary = write_shards(items, image_folder(), out)  # never raises
        assert summary["records"] == len(items)
        assert summary["samples"] + sum(summary["skipped"].values()) == len(items)
        assert sum(summary["sizes"].values()) == summary["samples"]
        event(f"a record was written: {summary['samples'] > 0}")
        for reason in summary["skipped"]:
            event(f"skip: {reason}")
        assert_written_shards_read(out, builders["conversations"], summary["samples"])


@FUZZ
@given(lines=st.lists(writer_records.map(lambda r: json.dumps(r).encode("utf-8", "surrogatepass")) | st.binary(max_size=30)
                      | st.just(b"[" * 1000 + b"]" * 1000), max_size=6))  # fmt: skip
def test_shards_write_on_arbitrary_jsonl_lines(builders, lines):
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "in.jsonl"
        source.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
        records_read, _ = read_records(source)
        summary = write_shards(records_read, image_folder(), Path(folder) / "out", source=str(source))
        non_blank = sum(1 for line in source.read_bytes().split(b"\n") if line.strip())
        assert summary["records"] == non_blank
        assert summary["samples"] + sum(summary["skipped"].values()) == non_blank
        assert_written_shards_read(Path(folder) / "out", builders["conversations"], summary["samples"])
