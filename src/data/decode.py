"""Safe decoding of WebDataset samples.

webdataset's default decoders unpickle `.pyd`/`.pickle` members and `torch.load` `.pth`
ones: a shard from the internet could run code. Here only images, JSON and text are ever
decoded; every other member is dropped by name, before its bytes are looked at.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections import Counter

from PIL import Image

from src.data.conversation import SampleError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_IMAGE_SUFFIX = re.compile(rf"^(?:(\d+)\.)?({'|'.join(IMAGE_EXTENSIONS)})$")


def decode_image(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now, so a truncated file fails here and not in a worker later
        return image.convert("RGB")
    except Exception as error:  # PIL raises many types for bad bytes
        raise SampleError("bad_image", f"image does not decode ({error})") from error


def decode_sample(raw: dict) -> tuple[dict, list[Image.Image]]:
    """Returns the sample's JSON record (or {} if none) and its images in order.

    Images are the members `jpg`, `1.jpg`, `2.png` ...: an optional index before the
    extension orders them, so several images per sample stay in their `<image>` order.
    """
    record: dict = {}
    text: str | None = None
    images: list[tuple[int, Image.Image]] = []
    for suffix, value in raw.items():
        if suffix.startswith("__"):
            continue
        if suffix == "json":
            try:
                record = json.loads(value)
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise SampleError("bad_json", f"JSON does not parse ({error})") from error
            if not isinstance(record, dict):
                raise SampleError("bad_json", "the JSON member is not an object")
        elif suffix == "txt":
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError as error:
                raise SampleError("bad_text", "text member is not UTF-8") from error
        elif match := _IMAGE_SUFFIX.match(suffix):
            images.append((int(match.group(1) or 0), decode_image(value)))
        # anything else (.pyd, .pickle, .pth, .npy ...) is never decoded
    if text is not None and "caption" not in record:
        record["caption"] = text.strip()  # img2dataset's layout: the caption is the .txt
    return record, [image for _, image in sorted(images, key=lambda item: item[0])]


class SkipCounter:
    """Counts skipped samples by reason; logs the first few of each reason."""

    def __init__(self, log_first: int = 3) -> None:
        self.total: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()
        self.log_first = log_first

    def skip(self, reason: str, detail: str) -> None:
        self.total[reason] += 1
        self._pending[reason] += 1
        if self.total[reason] <= self.log_first:
            log.warning("skipped a sample (%s): %s", reason, detail)

    def pending(self) -> bool:
        return bool(self._pending)

    def take(self) -> dict[str, int]:
        """Counts since the last call; batches carry them to the training process."""
        pending, self._pending = dict(self._pending), Counter()
        return pending
