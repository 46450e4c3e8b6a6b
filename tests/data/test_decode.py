"""src.data.decode: only images, JSON and text are ever decoded; errors carry reasons."""

from __future__ import annotations

import json
import logging
import pathlib
import pickle

import pytest
import webdataset as wds

from src.data.conversation import SampleError
from src.data.decode import SkipCounter, decode_image, decode_sample


class TouchOnUnpickle:
    """Unpickling this calls Path.touch: proof that a member was unpickled."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


RECORD = {"conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}


def test_the_payload_is_live(tmp_path):
    """Control: the pickle really does create its file when unpickled."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(TouchOnUnpickle(marker)))
    assert marker.exists()


def test_pickled_members_are_never_unpickled(tmp_path, jpeg_bytes):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(TouchOnUnpickle(marker))
    raw = {
        "__key__": "s0",
        "__url__": "x.tar",
        "jpg": jpeg_bytes(),
        "json": json.dumps(RECORD).encode(),
        "pyd": payload,
        "pickle": payload,
        "pth": payload,
        "npy": payload,
    }
    record, images = decode_sample(raw)
    assert not marker.exists()
    assert record == RECORD
    assert len(images) == 1
    assert not marker.exists()


def test_pickled_members_in_a_shard_are_never_unpickled(tmp_path, jpeg_bytes):
    """The same through webdataset's tar reader, as ShardStream reads shards."""
    from webdataset.tariterators import tarfile_samples

    marker = tmp_path / "pwned"
    shard = tmp_path / "evil.tar"
    with open(shard, "wb") as stream, wds.TarWriter(stream, encoder=False) as writer:
        payload = pickle.dumps(TouchOnUnpickle(marker))
        writer.write(
            {
                "__key__": "s0",
                "jpg": jpeg_bytes(),
                "json": json.dumps(RECORD).encode(),
                "pyd": payload,
                "pickle": payload,
            }
        )
    raws = list(tarfile_samples(iter([{"url": str(shard)}])))
    assert len(raws) == 1 and {"pyd", "pickle"} <= set(raws[0])
    record, images = decode_sample(raws[0])
    assert record == RECORD and len(images) == 1
    assert not marker.exists()


def test_images_come_in_index_order(jpeg_bytes):
    colours = {"jpg": (250, 0, 0), "1.jpg": (0, 250, 0), "2.png": (0, 0, 250), "10.webp": (250, 250, 0)}
    raw = {"__key__": "k"}
    for suffix in ("10.webp", "2.png", "jpg", "1.jpg"):  # stored out of order
        fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[suffix.rsplit(".", 1)[-1]]
        raw[suffix] = jpeg_bytes(colours[suffix], size=(8 + len(suffix), 8), fmt=fmt)
    record, images = decode_sample(raw)
    assert record == {}
    assert [image.size for image in images] == [(11, 8), (13, 8), (13, 8), (15, 8)]
    assert [image.mode for image in images] == ["RGB"] * 4
    for image, suffix in zip(images, ("jpg", "1.jpg", "2.png", "10.webp"), strict=True):
        pixel = image.getpixel((4, 4))
        assert all(abs(a - b) <= 8 for a, b in zip(pixel, colours[suffix], strict=True)), (suffix, pixel)


def test_txt_fills_the_caption(jpeg_bytes):
    record, images = decode_sample({"jpg": jpeg_bytes(), "txt": b"  a red circle \n"})
    assert record == {"caption": "a red circle"}
    assert len(images) == 1
    record, _ = decode_sample({"json": b'{"caption": "from json", "id": 3}', "txt": b"from txt"})
    assert record == {"caption": "from json", "id": 3}


def test_grey_and_palette_images_become_rgb(jpeg_bytes):
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.new("L", (5, 7), 100).save(buffer, format="PNG")
    image = decode_image(buffer.getvalue())
    assert image.mode == "RGB" and image.size == (5, 7) and image.getpixel((0, 0)) == (100, 100, 100)


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\xff\xd8\xff\xe0garbage"])
def test_garbage_image_is_bad_image(data):
    with pytest.raises(SampleError) as info:
        decode_sample({"jpg": data, "json": json.dumps(RECORD).encode()})
    assert info.value.reason == "bad_image"
    assert str(info.value).startswith("bad_image: image does not decode")


def test_truncated_jpeg_is_bad_image(jpeg_bytes):
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buffer, format="JPEG")
    data = buffer.getvalue()
    assert decode_image(data).size == (64, 64)
    with pytest.raises(SampleError) as info:
        decode_image(data[: len(data) // 2])
    assert info.value.reason == "bad_image"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"conversations": [', "JSON does not parse"),
        (b"\xff\xfe{}", "JSON does not parse"),
        (b"[1, 2]", "the JSON member is not an object"),
        (b'"text"', "the JSON member is not an object"),
    ],
)
def test_broken_json_is_bad_json(data, message, jpeg_bytes):
    with pytest.raises(SampleError) as info:
        decode_sample({"jpg": jpeg_bytes(), "json": data})
    assert info.value.reason == "bad_json"
    assert message in str(info.value)


def test_non_utf8_text_is_bad_text():
    with pytest.raises(SampleError) as info:
        decode_sample({"txt": b"\xff\xfe\xfa"})
    assert info.value.reason == "bad_text"


def test_skip_counter_counts_takes_and_logs_the_first_few(caplog):
    counter = SkipCounter(log_first=2)
    with caplog.at_level(logging.WARNING, logger="src.data.decode"):
        for i in range(4):
            counter.skip("bad_image", f"sample {i}")
        counter.skip("bad_json", "j")
        assert counter.take() == {"bad_image": 4, "bad_json": 1}
        assert counter.take() == {}
        counter.skip("bad_json", "k")
        counter.skip("bad_json", "l")
        assert counter.take() == {"bad_json": 2}
    assert dict(counter.total) == {"bad_image": 4, "bad_json": 3}
    logged = [r.getMessage() for r in caplog.records]
    assert logged == [
        "skipped a sample (bad_image): sample 0",
        "skipped a sample (bad_image): sample 1",
        "skipped a sample (bad_json): j",
        "skipped a sample (bad_json): k",
    ]
