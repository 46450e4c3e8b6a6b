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
from collections.abc import Callable

from PIL import Image

from src.data.conversation import SampleError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_IMAGE_SUFFIX = re.compile(rf"^(?:(\d+)\.)?({'|'.join(IMAGE_EXTENSIONS)})$")

DraftSize = Callable[[int, int], "tuple[int, int] | None"]
"""Given an image's stored (width, height): the smallest (width, height) its user needs, or None
for full size. `ImageTransform.draft_size` is one."""


def decode_image(data: bytes, draft: DraftSize | None = None) -> Image.Image:
    """The image as RGB, decoded now, so a truncated file fails here and not in a worker later.

    With `draft`, a JPEG at least twice the size it asks for (both sides) is decoded at 1/2,
    1/4 or 1/8 scale by libjpeg's DCT scaling, never below that size: much less work for a
    large photo bound for a 336 px view, and pixels close to, not equal to, a full decode
    resampled (see tests/data/test_decode.py for the tolerance). Any other image decodes
    exactly as without it.
    """
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as error:  # PIL raises many types for bad bytes
        raise SampleError("bad_image", f"image does not decode ({error})") from error
    if draft is not None and image.format == "JPEG":
        wanted = draft(*image.size)
        if wanted is not None:
            width, height = max(1, int(wanted[0])), max(1, int(wanted[1]))
            if min(image.width // width, image.height // height) >= 2:
                image.draft(None, (width, height))
    try:
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB image
    except Exception as error:
        raise SampleError("bad_image", f"image does not decode ({error})") from error


def decode_sample(raw: dict, draft: DraftSize | None = None) -> tuple[dict, list[Image.Image]]:
    """Returns the sample's JSON record (or {} if none) and its images in order.

    Images are the members `jpg`, `1.jpg`, `2.png` ...: an optional index before the
    extension orders them, so several images per sample stay in their `<image>` order.
    `draft` lets large JPEGs decode at a reduced scale (see `decode_image`).
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
            images.append((int(match.group(1) or 0), decode_image(value, draft)))
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
