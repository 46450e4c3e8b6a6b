"""src.data.decode: only images, JSON and text are ever decoded; errors carry reasons; large JPEGs
may decode reduced (draft hint) within a tolerance, everything else exactly as before."""

from __future__ import annotations

import io
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
    ("data", "reason", "message"),
    [
        (b'{"conversations": [', "bad_json", "JSON does not parse"),
        (b"\xff\xfe{}", "bad_json", "JSON does not parse"),
        (b"[1, 2]", "not_an_object", "a record must be a JSON object, got list"),
        (b'"text"', "not_an_object", "a record must be a JSON object, got str"),
    ],
)
def test_broken_json_is_bad_json(data, reason, message, jpeg_bytes):
    with pytest.raises(SampleError) as info:
        decode_sample({"jpg": jpeg_bytes(), "json": data})
    assert info.value.reason == reason  # JSON that is not a record: the writer's reason too
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


# ---- reduced (draft) JPEG decoding and the fast pad path ------------------------------------
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def photo_like(size: tuple[int, int], seed: int = 0, grey: bool = False, fmt: str = "JPEG") -> bytes:
    """A smooth colour field, shapes and noise, encoded like a photo (JPEG quality 90)."""
    from io import BytesIO

    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    width, height = size
    image = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (x, y, x + int(rng.integers(1, max(2, width // 2))), y + int(rng.integers(1, max(2, height // 2))))
        draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
    pixels = np.clip(pixels + rng.normal(0, 5, (height, width, 1)), 0, 255).astype(np.uint8)
    out = Image.fromarray(pixels)
    buffer = BytesIO()
    (out.convert("L") if grey else out).save(buffer, format=fmt, quality=90)
    return buffer.getvalue()


def pad_transform(size: int = 336):
    from src.model.vision import ImageTransform

    return ImageTransform(size, CLIP_MEAN, CLIP_STD, mode="pad")


def levels(a, b):
    """Absolute differences of two normalised CLIP tensors, in 8-bit levels."""
    import torch

    return (a - b).abs() * torch.tensor(CLIP_STD).view(3, 1, 1) * 255


@pytest.mark.parametrize(
    ("size", "reduced", "p99"),
    [((800, 600), (400, 300), 8), ((1024, 768), (512, 384), 8), ((600, 800), (300, 400), 8),
     ((700, 525), (350, 263), 35), ((1400, 1050), (350, 263), 40), ((2800, 1400), (350, 175), 40)],
)  # fmt: skip
def test_the_draft_hint_decodes_large_jpegs_smaller_and_close(size, reduced, p99):
    """At least twice the size the transform resamples to: decoded at 1/2, 1/4 or 1/8 scale, never
    below that size, and the view close to the full decode's. The DCT-domain reduction is a
    different low-pass than bicubic: a level or two on average, more at sharp edges, most when
    the reduced image is barely larger than the view (700 px -> 350 -> 336) or reduced 1/4, 1/8."""
    transform = pad_transform()
    data = photo_like(size)
    full, small = decode_image(data), decode_image(data, draft=transform.draft_size)
    assert full.size == size and small.size == reduced and small.mode == "RGB"
    wanted = transform.draft_size(*size)
    assert small.width >= wanted[0] and small.height >= wanted[1]
    diff = levels(transform(small)[0], transform(full)[0]).flatten()
    assert diff.mean() < 2.5
    assert diff.quantile(0.99) < p99


@pytest.mark.parametrize("size", [(640, 480), (671, 600), (336, 336), (100, 80), (480, 640)])
def test_the_draft_hint_leaves_smaller_jpegs_exact(size):
    """Under twice the target in either side: decoded exactly as without the hint."""
    transform = pad_transform()
    data = photo_like(size, seed=1)
    plain, hinted = decode_image(data), decode_image(data, draft=transform.draft_size)
    assert hinted.size == plain.size == size
    assert hinted.tobytes() == plain.tobytes()


def test_the_draft_hint_leaves_other_formats_and_no_answer_alone():
    transform = pad_transform()
    png = photo_like((1200, 900), fmt="PNG")
    assert decode_image(png, draft=transform.draft_size).tobytes() == decode_image(png).tobytes()
    jpeg = photo_like((1200, 900))
    assert decode_image(jpeg, draft=lambda w, h: None).tobytes() == decode_image(jpeg).tobytes()


def test_a_grey_jpeg_decodes_reduced_and_rgb():
    image = decode_image(photo_like((1000, 800), grey=True), draft=pad_transform().draft_size)
    assert image.mode == "RGB" and image.size == (500, 400)


def test_decode_sample_hands_the_hint_to_every_image():
    transform = pad_transform()
    raw = {
        "json": json.dumps(RECORD).encode(),
        "jpg": photo_like((1024, 768)),
        "1.png": photo_like((900, 700), fmt="PNG"),
    }
    _, full = decode_sample(raw)
    _, hinted = decode_sample(raw, draft=transform.draft_size)
    assert [i.size for i in full] == [(1024, 768), (900, 700)]
    assert [i.size for i in hinted] == [(512, 384), (900, 700)]


def test_draft_size_per_image_mode():
    from src.model.vision import ImageTransform

    assert ImageTransform(336, CLIP_MEAN, CLIP_STD).draft_size(1024, 768) == (336, 336)
    assert pad_transform().draft_size(1024, 768) == (336, 252)
    assert pad_transform().draft_size(500, 1000) == (168, 336)
    assert ImageTransform(336, CLIP_MEAN, CLIP_STD, mode="resize_crop").draft_size(1024, 768) == (448, 336)
    assert ImageTransform(336, CLIP_MEAN, CLIP_STD, mode="anyres").draft_size(1024, 768) is None


@pytest.mark.parametrize(
    ("size", "target", "fill"),
    [((640, 480), 336, None), ((480, 640), 336, None), ((500, 500), 336, None), ((1000, 90), 64, (0, 255, 7)),
     ((50, 30), 64, (9, 9, 9)), ((33, 20), 16, None)],
)  # fmt: skip
def test_the_pad_transform_equals_pad_then_resize_bit_for_bit(size, target, fill):
    """The pad mode skips the fill rows' horizontal pass; the pixels must not change."""
    import numpy as np
    import torch
    from PIL import Image

    from src.model.vision import ImageTransform, expand_to_square

    transform = ImageTransform(target, CLIP_MEAN, CLIP_STD, mode="pad", fill=fill)
    image = Image.open(io.BytesIO(photo_like(size, seed=2)))
    square = expand_to_square(image.convert("RGB"), transform.fill_colour)
    resized = np.asarray(square.resize((target, target), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    expected = (resized - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    assert torch.equal(transform(image), torch.from_numpy(expected).permute(2, 0, 1)[None])


def test_the_normalisation_is_bit_exact_for_every_byte_value():
    """(x / 255 - mean) / std in float32, as the reference computes it, for all 256 values."""
    import numpy as np
    import torch
    from PIL import Image

    from src.model.vision import ImageTransform

    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = Image.fromarray(np.stack([values, values[::-1], values.T], axis=-1))
    out = ImageTransform(16, CLIP_MEAN, CLIP_STD)(image)  # same size: resize copies the pixels
    as_float = np.asarray(image, dtype=np.float32) / 255.0
    expected = (as_float - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    assert out.is_contiguous() and torch.equal(out, torch.from_numpy(expected).permute(2, 0, 1)[None])
