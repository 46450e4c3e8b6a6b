"""Inputs: JSON records and caption shards become items; bad ones are counted, never fatal."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import pytest

from src.instruct.ledger import Ledger
from src.instruct.sources import Box, RecordSource, ShardSource


def test_records_with_pixel_boxes_are_normalised_by_the_image_size(tmp_path, jpeg_bytes):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(jpeg_bytes(size=(200, 100)))
    (tmp_path / "img" / "b.png").write_bytes(jpeg_bytes(size=(10, 10), fmt="PNG"))
    records = [
        # the size comes from the image's header
        {"id": "a", "image": "a.jpg", "caption": "One cat.", "boxes": [{"category": "cat", "bbox": [20, 10, 120, 90]}]},
        # or from the record
        {
            "image": "b.png",
            "captions": ["x", " "],
            "width": 400,
            "height": 400,
            "boxes": [{"label": "dog", "box": [0, 0, 200, 100]}],
        },
        {"id": "c", "image": "missing.jpg", "caption": "Gone."},
        {"id": "d", "image": "a.jpg", "captions": []},
        {"id": "a", "image": "a.jpg", "caption": "Again."},
        {"id": "e", "image": "../etc/passwd", "caption": "Out."},
        {"id": "f", "image": "a.jpg", "caption": "Bad box.", "boxes": [{"category": "cat", "bbox": [1, 2, 3]}]},
        {
            "id": "g",
            "image": "a.jpg",
            "caption": "Flat box.",
            "boxes": [{"category": "cat", "bbox": [5, 5, 5, 9]}, {"category": "cat", "bbox": [5, 5, 20, 10]}],
        },
        # a flat box in an item skipped for another reason is not counted as dropped
        {
            "id": "h",
            "image": "a.jpg",
            "caption": "Both.",
            "boxes": [{"category": "cat", "bbox": [5, 5, 5, 9]}, {"category": "cat", "bbox": [1]}],
        },
        "not an object",
    ]
    (tmp_path / "r.json").write_text(json.dumps(records))
    source = RecordSource(tmp_path / "r.json", tmp_path / "img")
    items = list(source)
    assert source.total == 10
    assert [(i.id, i.image, i.captions) for i in items] == [
        ("a", "a.jpg", ["One cat."]),
        ("b.png", "b.png", ["x"]),
        ("g", "a.jpg", ["Flat box."]),  # its one box has no area: the box is dropped, not the image
    ]
    assert items[0].boxes == [Box("cat", 0.1, 0.1, 0.6, 0.9)]
    assert items[1].boxes == [Box("dog", 0.0, 0.0, 0.5, 0.25)]
    assert items[2].boxes == [Box("cat", 0.025, 0.05, 0.1, 0.1)]
    assert dict(source.skips.total) == {
        "missing_image": 1, "no_captions": 1, "duplicate_id": 1, "bad_image_path": 1, "bad_box": 2, "not_an_object": 1,
    }  # fmt: skip
    assert dict(source.boxes_dropped) == {"no_area": 1}


def test_normalised_boxes_and_jsonl_with_a_broken_line(tmp_path, jpeg_bytes):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    lines = [
        json.dumps(
            {"id": 1, "image": "a.jpg", "caption": "A.", "boxes": [{"category": "cat", "bbox": [0.1, 0.2, 0.3, 0.4]}]}
        ),
        '{"id": 2, "image": "a.jpg", "capt',
        json.dumps({"id": 3, "image": "a.jpg", "caption": "C."}),
    ]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    source = RecordSource(tmp_path / "r.jsonl", tmp_path, boxes_normalized=True)
    items = list(source)
    assert [i.id for i in items] == ["1", "3"]
    assert items[0].boxes == [Box("cat", 0.1, 0.2, 0.3, 0.4)]
    assert dict(source.skips.total) == {"bad_json": 1}
    assert list(source) == items  # a second pass (the output pass) yields the same items


def _tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


class _Touch:
    """Unpickling this creates a file: proof that a reader ran a shard's pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_caption_shards_are_read_without_unpickling(tmp_path, jpeg_bytes):
    marker = tmp_path / "pickle-was-run"
    jpg = jpeg_bytes(size=(100, 50))
    _tar(
        tmp_path / "s-000000.tar",
        [
            ("x/one", {"jpg": jpg, "txt": b"A red square.", "pyd": pickle.dumps(_Touch(str(marker)))}),
            ("two", {"png": jpg, "json": json.dumps({"caption": "From json.", "boxes": [{"category": "sq", "bbox": [10, 5, 60, 45]}]}).encode()}),
            ("three", {"jpg": jpg, "1.jpg": jpg, "txt": b"Two images."}),
            ("four", {"txt": b"No image."}),
            ("five", {"jpg": jpg, "json": b"{not json"}),
        ],
    )  # fmt: skip
    source = ShardSource(str(tmp_path / "s-{000000..000000}.tar"))
    items = list(source)
    assert not marker.exists()
    assert [(i.id, i.image, i.captions) for i in items] == [
        ("x/one", "x_one.jpg", ["A red square."]),
        ("two", "two.png", ["From json."]),
    ]
    assert items[0].data == jpg and items[1].boxes == [Box("sq", 0.1, 0.1, 0.6, 0.9)]
    assert dict(source.skips.total) == {"not_one_image": 2, "bad_json": 1}


def test_the_ledger_keeps_the_last_verdict_and_refuses_a_corrupt_middle_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with Ledger(path) as ledger:
        ledger.write({"id": "1", "kind": "detail", "status": "rejected"})
        ledger.write({"id": "1", "kind": "detail", "status": "ok"})
        ledger.write({"id": "2", "kind": "detail", "status": "error"})
    ledger = Ledger(path)
    ledger.close()
    assert ledger.done("1", "detail") and not ledger.done("2", "detail") and not ledger.done("1", "conversation")
    assert len(ledger.history) == 3 and ledger.torn == 0
    path.write_bytes(path.read_bytes() + b'{"id": "3", "ki')
    ledger = Ledger(path)
    ledger.write({"id": "3", "kind": "detail", "status": "ok"})
    ledger.close()
    assert ledger.torn == 1 and [json.loads(line)["id"] for line in path.read_bytes().splitlines()] == [
        "1",
        "1",
        "2",
        "3",
    ]
    path.write_bytes(b'{"id": "1", "kind": "detail", "status": "ok"}\ngarbage\n{"id": "2", "kind": "detail"}\n')
    with pytest.raises(ValueError, match="line 2 is not a ledger entry"):
        Ledger(path)


def test_a_second_run_on_the_same_ledger_is_refused(tmp_path):
    with Ledger(tmp_path / "ledger.jsonl"):
        with pytest.raises(ValueError, match="in use by another run"):
            Ledger(tmp_path / "ledger.jsonl")
    Ledger(tmp_path / "ledger.jsonl").close()  # free again once the first is closed
