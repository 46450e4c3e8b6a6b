"""Reading the inputs of a shard writer or of JSON prediction: LLaVA JSON / JSONL records and
image files, checked as the shard reader will check them.

Apart from `src/data/shards/` (the writer and inspector) so that the stream, which reads
JSON inputs for prediction, does not import the writer, nor the writer the stream.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from src.data.conversation import SampleError
from src.data.decode import IMAGE_FORMATS, MAX_PIXELS, ImagePolicy, decode_image
from src.data.records import parse_json

_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}
CONVERTED_FORMATS = ("GIF", "BMP", "TIFF")
"""Input image formats the writer re-encodes to PNG (OCR-VQA's GIFs); any other is refused."""
WRITER_POLICY = ImagePolicy(IMAGE_FORMATS + CONVERTED_FORMATS, MAX_PIXELS)


def read_records(path: Path) -> tuple[Iterator[Any], int | None]:
    """The records of a JSON list or a JSONL file, and their number when known.

    `.jsonl` is read as JSONL; anything else is sniffed: a first character `[` means one JSON
    list (loaded whole, as LLaVA loads it), otherwise one record per line. A JSONL line that
    does not parse (or nests too deeply) comes out as a `SampleError` so the writer counts it and
    goes on; blank lines are ignored. A JSON list that does not parse as a whole raises
    ValueError naming the file: there is no record boundary to skip to.
    """
    with open(path, "rb") as stream:
        head = stream.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if path.suffix != ".jsonl" and head.startswith(b"["):
        try:
            records = json.loads(path.read_bytes())
        except RecursionError as error:
            raise ValueError(
                f"{path} holds a record nested deeper than Python's JSON parser allows; as JSONL (one record "
                "per line) such records are skipped one by one"
            ) from error
        except ValueError as error:
            raise ValueError(f"{path} is not valid JSON ({error})") from error
        if not isinstance(records, list):
            raise ValueError(f"{path} is not a JSON list of records")
        return iter(records), len(records)
    return _jsonl(path), None


def _jsonl(path: Path) -> Iterator[Any]:
    with open(path, "rb") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                yield parse_json(line)
            except SampleError as error:  # bad_json / too_deep: counted, and the next line is read
                yield SampleError(error.reason, f"line {number}: {error}")


def image_format(data: bytes) -> str | None:
    """The member extension for bytes the reader takes as they are, from their magic number."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _to_png(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data), formats=WRITER_POLICY.formats) as image:
        image.load()
        if image.mode not in _PNG_MODES:
            image = image.convert("RGBA" if image.mode.endswith("A") else "RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()


def load_image(path: Path, policy: ImagePolicy = WRITER_POLICY) -> tuple[bytes, str, bool]:
    """(bytes, member extension, whether re-encoded) of one image file."""
    if not path.is_file():
        raise SampleError("missing_image", f"{path} is not a file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SampleError("bad_image", f"{path} cannot be read ({error})") from error
    try:
        decode_image(data, policy=policy)  # the reader's own check: what is written here reads there
    except SampleError as error:
        raise SampleError(error.reason, f"{path}: {str(error)[len(error.reason) + 2 :]}") from error
    fmt = image_format(data)
    return (data, fmt, False) if fmt else (_to_png(data), "png", True)
