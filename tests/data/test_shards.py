"""src.data.shards (writer, inspector, cli): LLaVA JSON to shards that read back exactly, and a report that never decodes unsafely."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image
from webdataset.tariterators import tarfile_samples

from src.data.conversation import ConversationEncoder, build_template
from src.data.datamodule import count_samples, expand_shards, read_sizes
from src.data.decode import decode_sample
from src.data.inputs import read_records
from src.data.shards import format_report, inspect_shards, write_shards
from src.data.shards.cli import main
from src.data.shards.writer import RECORD, member_bytes, tar_bytes

IMAGE_TOKENS = 16  # as tests/conftest.py


def chat(*values: str) -> list[dict[str, str]]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def image_file(path: Path, fmt: str, colour=(200, 30, 30), size=(16, 16)) -> bytes:
    """Saves an image in `fmt` whatever `path`'s extension says; returns the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


@pytest.fixture
def llava(tmp_path) -> tuple[list[dict], Path, dict[str, bytes]]:
    """A multi-turn sample, a text-only one and a two-image one whose first image is a PNG named .jpg."""
    root = tmp_path / "images"
    files = {
        "coco/red.jpg": image_file(root / "coco/red.jpg", "JPEG", (220, 40, 40), (16, 16)),
        "ocr/green.jpg": image_file(root / "ocr/green.jpg", "PNG", (40, 170, 60), (20, 10)),
        "vg/blue.webp": image_file(root / "vg/blue.webp", "WEBP", (40, 80, 220), (10, 20)),
    }
    records = [
        {
            "id": "000000033471",
            "image": "coco/red.jpg",
            "conversations": chat(
                "<image>\nWhat colour is the circle?", "It is red.", "How many objects are there?", "There is one."
            ),
        },
        {"id": "text_0", "conversations": chat("What shape is the red object?", "It is a circle.")},
        {
            "id": "two",
            "images": ["ocr/green.jpg", "vg/blue.webp"],
            "conversations": chat("<image>\n<image>\nHow many objects are there?", "There are two."),
        },
    ]
    return records, root, files


def read_back(path: Path) -> list[dict]:
    """Raw samples as the training reader sees them."""
    return list(tarfile_samples(iter([{"url": str(path)}])))


def test_round_trip_keeps_records_and_image_bytes(tmp_path, llava, read_tar):
    records, root, files = llava
    summary = write_shards(records, root, tmp_path / "out")
    assert summary == {
        "records": 3,
        "samples": 3,
        "images": 3,
        "text_only": 1,
        "reencoded": 0,
        "shards": 1,
        "sizes": {"train-000000.tar": 3},
        "skipped": {},
        "oversized": 0,
        "removed_stale": [],
    }
    assert json.loads((tmp_path / "out/train-summary.json").read_text()) == summary
    members = read_tar(tmp_path / "out/train-000000.tar")
    assert [(key, sorted(parts)) for key, parts in members] == [
        ("000000033471", ["jpg", "json"]),
        ("text_0", ["json"]),
        ("two", ["0.png", "1.webp", "json"]),  # named by the bytes, not the file name
    ]
    assert members[0][1]["jpg"] == files["coco/red.jpg"]
    assert members[2][1]["0.png"] == files["ocr/green.jpg"]
    assert members[2][1]["1.webp"] == files["vg/blue.webp"]

    raws = read_back(tmp_path / "out/train-000000.tar")
    decoded = [decode_sample(raw) for raw in raws]
    assert [record for record, _ in decoded] == records  # image paths kept for provenance
    assert [[image.size for image in images] for _, images in decoded] == [[(16, 16)], [], [(20, 10), (10, 20)]]


def test_jsonl_broken_lines_are_counted(tmp_path, llava):
    records, root, _ = llava
    lines = [json.dumps(records[0]), "{not json", "", json.dumps([1, 2]), json.dumps(records[1]), '"a string"']
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    stream, total = read_records(path)
    assert total is None
    summary = write_shards(stream, root, tmp_path / "out")
    assert summary["skipped"] == {"bad_json": 1, "not_an_object": 2}
    assert (summary["records"], summary["samples"]) == (5, 2)  # the blank line is no record


@pytest.mark.parametrize(("name", "text", "kind"), [("a.json", "{}\n{}\n", "lines"), ("a.txt", "[{}, {}]", "list")])
def test_format_is_sniffed_from_content(tmp_path, name, text, kind):
    path = tmp_path / name
    path.write_text(text)
    records, total = read_records(path)
    assert list(records) == [{}, {}]
    assert total == (2 if kind == "list" else None)


def test_bad_records_are_skipped_by_reason(tmp_path, llava):
    _, root, _ = llava
    (root / "bad").mkdir()
    (root / "bad/garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    noise = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(noise, format="JPEG")
    (root / "bad/truncated.jpg").write_bytes(noise.getvalue()[: len(noise.getvalue()) // 2])
    good = chat("<image>\nWhat colour is the circle?", "It is red.")
    records = [
        {"id": "missing", "image": "coco/nope.jpg", "conversations": good},
        {"id": "garbage", "image": "bad/garbage.jpg", "conversations": good},
        {"id": "truncated", "image": "bad/truncated.jpg", "conversations": good},
        {"id": "two tags one image", "image": "coco/red.jpg", "conversations": chat("<image> <image>", "It is red.")},
        {"id": "no tag", "image": "coco/red.jpg", "conversations": chat("What colour?", "It is red.")},
        {"id": "tag no image", "conversations": good},
        {"id": "no conversations", "image": "coco/red.jpg"},
        {"id": "two humans", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
        {"id": "empty", "conversations": []},
        {"id": "blank answer", "conversations": chat("What colour?", "  ")},
        {"id": "outside", "image": "../secret.jpg", "conversations": good},
        {"id": "both", "image": "coco/red.jpg", "images": ["coco/red.jpg"], "conversations": good},
        ["not", "an", "object"],
        {"id": "good", "image": "coco/red.jpg", "conversations": good},
    ]
    summary = write_shards(records, root, tmp_path / "out")
    assert summary["skipped"] == {
        "bad_conversation": 1,
        "bad_image": 2,
        "bad_image_path": 2,
        "empty_conversation": 2,
        "image_tag_mismatch": 3,
        "missing_field": 1,  # no conversations: the stream's reason for the same fault
        "missing_image": 1,
        "not_an_object": 1,
    }
    assert (summary["samples"], summary["images"]) == (1, 1)
    assert [raw["__key__"] for raw in read_back(tmp_path / "out/train-000000.tar")] == ["good"]


def test_other_formats_are_reencoded_to_png(tmp_path):
    root = tmp_path / "images"
    image_file(root / "a.jpg", "GIF", (250, 0, 0), (12, 9))  # a GIF under a .jpg name, as in OCR-VQA
    record = {"id": "g", "image": "a.jpg", "conversations": chat("<image>\nWhat colour?", "It is red.")}
    summary = write_shards([record], root, tmp_path / "out")
    assert (summary["samples"], summary["reencoded"]) == (1, 1)
    raw = read_back(tmp_path / "out/train-000000.tar")[0]
    assert sorted(k for k in raw if not k.startswith("__")) == ["json", "png"]
    _, images = decode_sample(raw)
    assert images[0].size == (12, 9) and images[0].getpixel((3, 3)) == (250, 0, 0)


def text_records(n: int) -> list[dict]:
    return [{"id": f"t{i}", "conversations": chat("How many objects are there?", "There is one.")} for i in range(n)]


def test_shards_roll_over_at_max_count(tmp_path):
    out = tmp_path / "out"
    summary = write_shards(text_records(5), tmp_path, out, max_count=2)
    expected = {"train-000000.tar": 2, "train-000001.tar": 2, "train-000002.tar": 1}
    assert summary["sizes"] == expected
    assert json.loads((out / "sizes.json").read_text()) == expected
    shards = expand_shards(str(out / "train-{000000..000002}.tar"))
    assert count_samples(shards) == 5
    assert [len(read_back(Path(s))) for s in shards] == [2, 2, 1]


def noisy_records(root: Path, n: int) -> list[dict]:
    """Samples larger than one 10 KiB tar record each, so every one moves a shard's size."""
    records = []
    for i in range(n):
        path = root / f"n{i}.jpg"
        buffer = io.BytesIO()
        Image.effect_noise((96 + 8 * i, 96), 90).convert("RGB").save(buffer, format="JPEG", quality=95)
        path.write_bytes(buffer.getvalue())
        records.append({"id": f"n{i}", "image": path.name, "conversations": chat("<image>\nWhat colour?", "Red.")})
    return records


def sample_bytes(path: Path) -> list[int]:
    """Bytes each sample takes in the tar, from the members' real sizes."""
    with tarfile.open(path) as tar:
        sizes: dict[str, int] = {}
        for member in tar.getmembers():
            key = member.name.split(".", 1)[0]
            sizes[key] = sizes.get(key, 0) + member_bytes(member.size)
    return list(sizes.values())


def test_shards_roll_over_before_max_size(tmp_path):
    records = noisy_records(tmp_path, 7)
    whole = write_shards(records, tmp_path, tmp_path / "one", max_size=10**9)
    per_sample = sample_bytes(tmp_path / "one/train-000000.tar")
    assert (tmp_path / "one/train-000000.tar").stat().st_size == tar_bytes(sum(per_sample))
    assert whole["shards"] == 1 and min(per_sample) > RECORD

    max_size = tar_bytes(sum(per_sample[:3]))  # the first three fit exactly
    summary = write_shards(records, tmp_path, tmp_path / "out", max_size=max_size)
    counts = list(summary["sizes"].values())
    assert counts[0] == 3 and sum(counts) == 7 and summary["oversized"] == 0
    start = 0
    for name, count in summary["sizes"].items():
        size = (tmp_path / "out" / name).stat().st_size
        content = sum(per_sample[start : start + count])
        assert size == tar_bytes(content) <= max_size
        if start + count < 7:  # the next sample would not have fitted
            assert tar_bytes(content + per_sample[start + count]) > max_size
        start += count

    alone = write_shards(records, tmp_path, tmp_path / "small", max_size=RECORD)  # smaller than any sample
    assert alone["sizes"] == {f"train-{i:06d}.tar": 1 for i in range(7)}
    assert alone["oversized"] == 7


def test_keys_are_unique_and_dot_free(tmp_path):
    ids = ["a.b", "a.b", "a_b", "", None, "x/y.z", "a.b", 7, "ü" * 3, "k" * 80]
    records = [{"conversations": chat("q", "It is red.")} | ({} if i is None else {"id": i}) for i in ids]
    write_shards(records, tmp_path, tmp_path / "out")
    raws = read_back(tmp_path / "out/train-000000.tar")
    keys = [raw["__key__"] for raw in raws]
    assert keys == ["a_b", "a_b_1", "a_b_2", "sample3", "sample4", "x_y_z", "a_b_3", "7", "___", "k" * 64]
    assert [json.loads(raw["json"]).get("id") for raw in raws] == ids  # grouping kept every sample whole


def test_sizes_json_keeps_other_sets_and_stale_shards_go(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sizes.json").write_text(json.dumps({"val-000000.tar": 7, "train-000009.tar": 3, "train-x.tar": 1}))
    (out / "train-000009.tar").write_bytes(b"old")
    (out / "train-extra-000000.tar").write_bytes(b"not ours")
    summary = write_shards(text_records(3), tmp_path, out, max_count=2)
    assert summary["removed_stale"] == ["train-000009.tar"]
    assert json.loads((out / "sizes.json").read_text()) == {
        "train-000000.tar": 2,
        "train-000001.tar": 1,
        "train-x.tar": 1,
        "val-000000.tar": 7,
    }
    assert read_sizes([str(out / "train-000000.tar"), str(out / "train-000001.tar")]) == {
        str(out / "train-000000.tar"): 2,
        str(out / "train-000001.tar"): 1,
    }
    assert (out / "train-extra-000000.tar").read_bytes() == b"not ours"
    again = write_shards(text_records(3), tmp_path, out, max_count=3)
    assert again["removed_stale"] == ["train-000001.tar"]
    assert sorted(p.name for p in out.glob("train-0*.tar")) == ["train-000000.tar"]

    table = (out / "sizes.json").read_text()
    nothing = write_shards([{"id": "m", "image": "gone.jpg", "conversations": chat("<image>", "Red.")}], tmp_path, out)
    assert (nothing["shards"], nothing["skipped"], nothing["removed_stale"]) == (0, {"missing_image": 1}, [])
    assert (out / "sizes.json").read_text() == table and (out / "train-000000.tar").is_file()


def test_rerun_gives_identical_bytes(tmp_path, llava):
    records, root, _ = llava
    first = write_shards(records * 3, root, tmp_path / "a", max_count=4)
    second = write_shards(records * 3, root, tmp_path / "b", max_count=4)
    assert first == second
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert names == ["sizes.json", "train-000000.tar", "train-000001.tar", "train-000002.tar", "train-summary.json"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_inspect_reports_counts_and_token_lengths(tmp_path, llava, tokenizer):
    records, root, _ = llava
    out = tmp_path / "out"
    write_shards(records, root, out, max_count=2)
    encoder = ConversationEncoder(tokenizer, build_template("vicuna_v1"), IMAGE_TOKENS, max_length=10**6)
    lengths = [len(encoder.encode(r["conversations"], n).input_ids) for r, n in zip(records, (1, 0, 2), strict=True)]
    low, mid, high = sorted(lengths)
    report = inspect_shards(str(out / "train-{000000..000001}.tar"), tokenizer, image_tokens=IMAGE_TOKENS,
                            max_length=mid)  # fmt: skip
    assert report["tokens"] == {
        "count": 3,
        "min": low,
        "mean": round(sum(lengths) / 3, 1),
        "p50": mid,
        "p95": high,
        "max": high,
        "over_max_length": 1,
    }
    one_token_images = ConversationEncoder(tokenizer, build_template("vicuna_v1"), 1, max_length=10**6)
    assert lengths[2] == len(one_token_images.encode(records[2]["conversations"], 2).input_ids) + 2 * (IMAGE_TOKENS - 1)

    text = format_report(report, image_tokens=IMAGE_TOKENS, max_length=mid)
    lines = text.splitlines()
    assert lines[:9] == [
        "2 shards, 3 samples",
        f"  {out}/train-000000.tar: 2 samples (sizes.json: 2)",
        f"  {out}/train-000001.tar: 1 samples (sizes.json: 1)",
        "members: jpg 1, png 1, webp 1, json 3, txt 0, unsafe 0, other 0",
        "images per sample: 0: 1, 1: 1, 2: 1",
        "text-only samples: 1",
        "fields: conversations 3, caption 0, mc 0",
        "corrupt samples: none",
        f"tokens (conversations view, vicuna_v1, 16 per image, 3 examples): min {low} / mean {round(sum(lengths) / 3, 1)}"
        f" / p50 {mid} / p95 {high} / max {high}; 1 over max_length {mid}",
    ]
    assert lines[9] == f"sample 000000033471 ({out}/train-000000.tar):"
    rendered = lines[10]
    assert rendered.startswith("<s> A chat between a curious user")
    assert rendered.endswith(
        "USER : <image> What colour is the circle ? ASSISTANT : [[It is red . </s>]] "
        "USER : How many objects are there ? ASSISTANT : [[There is one . </s>]]"
    )
    assert rendered.count("<image>") == 1  # 16 placeholder tokens shown as one tag

    first_only = inspect_shards(str(out / "train-{000000..000001}.tar"), samples=1)
    assert format_report(first_only).splitlines()[:2] == [
        "1 shards, 1 samples (stopped at --samples)",
        f"  {out}/train-000000.tar: 1 samples (sizes.json: 2, not read to the end)",
    ]


class OpenOnUnpickle:
    """Unpickling this calls open(path, 'w'): proof that a member was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickle_members_are_never_unpickled(tmp_path, tokenizer, jpeg_bytes):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(OpenOnUnpickle(control))).close()
    assert control.exists()  # the payload is live

    marker = tmp_path / "pwned"
    payload = pickle.dumps(OpenOnUnpickle(marker))
    record = {"id": "x", "conversations": chat("<image>\nWhat colour is the circle?", "It is red.")}
    shard = tmp_path / "evil.tar"
    with open(shard, "wb") as stream, wds.TarWriter(stream, encoder=False) as writer:
        writer.write({"__key__": "x", "pyd": payload, "jpg": jpeg_bytes(), "json": json.dumps(record).encode()})
        writer.write(
            {"__key__": "y", "pth": payload, "pkl": payload, "json": json.dumps(record | {"id": "y"}).encode()}
        )

    report = inspect_shards(str(shard), tokenizer, image_tokens=IMAGE_TOKENS)
    assert not marker.exists()
    assert dict(report["unsafe"]) == {"pyd": 1, "pth": 1, "pkl": 1}
    assert "unsafe members, never decoded: pkl 1, pth 1, pyd 1" in format_report(report).splitlines()
    assert dict(report["corrupt"]) == {"missing_image": 1}  # y has a tag but no image: checked without a view
    assert dict(report["unencodable"]) == {}
    for raw in read_back(shard):
        decode_sample(raw)
    assert not marker.exists()


def img2dataset_shard(path: Path, jpeg_bytes, captions: list[str]) -> None:
    """A shard as img2dataset writes it: `jpg`, `txt` caption and a `json` of download metadata."""
    with open(path, "wb") as stream, wds.TarWriter(stream, encoder=False) as writer:
        for i, caption in enumerate(captions):
            key = f"{i:09d}"
            meta = {
                "url": f"https://example.com/{i}.jpg",
                "key": key,
                "status": "success",
                "error_message": None,
                "width": 64,
                "height": 64,
                "original_width": 640,
                "original_height": 480,
                "exif": "{}",
                "sha256": "0" * 64,
                "caption": caption,
            }
            writer.write(
                {"__key__": key, "jpg": jpeg_bytes(), "txt": caption.encode(), "json": json.dumps(meta).encode()}
            )


def test_img2dataset_layout_reads_without_conversion(tmp_path, jpeg_bytes, make_builder, tokenizer):
    captions = ["One object on a grey background: a red circle.", "Two objects on a grey background."]
    shard = tmp_path / "00000.tar"
    img2dataset_shard(shard, jpeg_bytes, captions)
    builder = make_builder("caption")
    for raw, caption in zip(read_back(shard), captions, strict=True):
        record, images = decode_sample(raw)
        assert record["caption"] == caption and record["status"] == "success"
        [example] = builder(record, images)
        assert example.pixel_values.shape == (1, 3, 64, 64)
        supervised = [t for t in example.labels.tolist() if t >= 0]
        assert supervised == tokenizer(caption, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    report = inspect_shards(str(shard), tokenizer, view="caption", image_tokens=IMAGE_TOKENS)
    lines = format_report(report, view="caption", image_tokens=IMAGE_TOKENS).splitlines()
    assert lines[:8] == [
        "1 shards, 2 samples",
        f"  {shard}: 2 samples (not in a sizes.json)",
        "members: jpg 2, png 0, webp 0, json 2, txt 2, unsafe 0, other 0",
        "images per sample: 1: 2",
        "text-only samples: 0",
        "fields: conversations 0, caption 2, mc 0",
        "corrupt samples: none",
        lines[7],
    ]
    assert lines[7].startswith("tokens (caption view, vicuna_v1, 16 per image, 2 examples)")


def test_inspect_counts_corrupt_samples_and_cut_shards(tmp_path, jpeg_bytes):
    record = json.dumps({"conversations": chat("<image>\nq", "It is red.")}).encode()
    shard = tmp_path / "train-000000.tar"
    with open(shard, "wb") as stream, wds.TarWriter(stream, encoder=False) as writer:
        writer.write({"__key__": "ok", "jpg": jpeg_bytes(), "json": record})
        writer.write({"__key__": "bad_image", "jpg": b"\xff\xd8\xffnot a jpeg", "json": record})
        writer.write({"__key__": "bad_json", "jpg": jpeg_bytes(), "json": b'{"conversations": ['})
    (tmp_path / "sizes.json").write_text(json.dumps({"train-000000.tar": 5}))
    with tarfile.open(shard) as tar:
        second = tar.getmember("bad_image.jpg").offset_data
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[: second + 5])  # ends inside the second sample's image

    report = inspect_shards([str(shard), str(cut)])
    assert dict(report["corrupt"]) == {"bad_image": 1, "bad_json": 1}
    assert report["samples"] == 4 and len(report["shard_errors"]) == 1
    lines = format_report(report).splitlines()
    assert f"  {shard}: 3 samples (sizes.json: 5, MISMATCH)" in lines
    assert "corrupt samples: bad_image 1, bad_json 1" in lines
    assert lines[-1].startswith(f"shard error: {cut}: ")


def test_cli_writes_then_inspects(tmp_path, llava, demo_dir, capsys):
    records, root, _ = llava
    (tmp_path / "llava.json").write_text(json.dumps(records))
    main(["write", "--json", str(tmp_path / "llava.json"), "--images", str(root), "--out", str(tmp_path / "out"),
          "--prefix", "sft", "--max-count", "2", "--max-size", "1e6", "--limit", "2"])  # fmt: skip
    written = capsys.readouterr()
    assert written.out.splitlines() == [
        f"read 2 records; wrote 2 samples (1 images, 1 text-only, 0 re-encoded to png) in 1 shards to {tmp_path / 'out'}",
        "skipped 0",
        f"summary: {tmp_path / 'out/sft-summary.json'}",
    ]
    assert "records" in written.err  # the progress bar
    main(["inspect", str(tmp_path / "out/sft-000000.tar"), "--tokenizer", str(demo_dir / "tokenizer"),
          "--image-tokens", "16", "--show", "0"])  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["1 shards, 2 samples", f"  {tmp_path}/out/sft-000000.tar: 2 samples (sizes.json: 2)"]
    assert lines[-1].startswith("tokens (conversations view, vicuna_v1, 16 per image, 2 examples): min ")

    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(SystemExit) as info:
        main(["write", "--json", str(tmp_path / "broken.json"), "--images", str(root), "--out", str(tmp_path / "x")])
    assert info.value.code == 2
    assert "cannot read" in capsys.readouterr().err
