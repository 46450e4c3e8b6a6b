"""Safe decoding of WebDataset samples.

webdataset's default decoders unpickle `.pyd`/`.pickle` members and `torch.load` `.pth`
ones: a shard from the internet could run code. Here only images, JSON and text are ever
decoded; every other member is dropped by name, before its bytes are looked at.

Images are decoded only in the formats an `ImagePolicy` allows (JPEG, PNG and WebP unless the
data config says otherwise), told by their bytes, never by the member's name: a `.jpg` member
holding an EPS file never reaches Pillow's Ghostscript handler. And an image whose header claims
more pixels than the policy's budget is refused before its pixels are decoded, so a 100 KB PNG
that would inflate to gigabytes costs a header read.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from src.data.conversation import SampleError
from src.data.records import parse_object

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
IMAGE_MEMBER = re.compile(rf"^(?:(\d+)\.)?({'|'.join(IMAGE_EXTENSIONS)})$")
"""A sample's image member names (`jpg`, `0.png` ...): the reader, the inspector and instruct's sources
agree on what is an image."""
OTHER_IMAGE_EXTENSIONS = (
    "gif", "bmp", "tif", "tiff", "jfif", "jpe", "apng", "avif", "heic", "heif", "jp2", "j2k", "jxl",
    "ico", "eps", "ps", "psd", "tga", "ppm", "pgm", "pbm", "pnm", "svg", "dds", "qoi",
)  # fmt: skip
"""Member names of images in formats the writer does not store. Such a member is still an image
of its sample: it is decoded by content under the policy (so a config that allows GIF reads
`.gif` members), and refused otherwise (`bad_image_format`), never dropped unseen, which would
leave a caption or a question with no image at all."""
OTHER_IMAGE_MEMBER = re.compile(rf"^(?:(\d+)\.)?({'|'.join(OTHER_IMAGE_EXTENSIONS)})$")

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
"""Formats decoded by default, as Pillow names them: what the writer stores (and what web-scale
image sets hold). A camera JPEG that Pillow reads as MPO is a JPEG here."""
MAX_PIXELS = 40_000_000
"""Default pixel budget per image (width x height from the header; 7,300 x 5,500, 120 MB as RGB):
below Pillow's own limit (89 million pixels, where it only warns), far above what a vision tower
needs."""

DraftSize = Callable[[int, int], "tuple[int, int] | None"]
"""Given an image's stored (width, height): the smallest (width, height) its user needs, or None
for full size. `ImageTransform.draft_size` is one."""


@dataclass(frozen=True)
class ImagePolicy:
    """Which real image formats decode, and how many pixels one image may have."""

    formats: tuple[str, ...] = IMAGE_FORMATS
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        formats = (self.formats,) if isinstance(self.formats, str) else tuple(self.formats)
        Image.init()  # every plugin registered, so every name Pillow knows can be checked
        unknown = [f for f in formats if not isinstance(f, str) or f.upper() not in Image.OPEN]
        if not formats or unknown:
            raise ValueError(f"unknown image formats {unknown or formats!r}; choose from Pillow's {sorted(Image.OPEN)}")
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ValueError(f"max image pixels must be a positive whole number, got {self.max_pixels!r}")
        object.__setattr__(self, "formats", tuple(f.upper() for f in formats))


DEFAULT_POLICY = ImagePolicy()


def sniff_format(data: bytes) -> str | None:
    """The format Pillow would read these bytes as, from their first bytes alone (each plugin's
    magic-number test; nothing is parsed), to name a refused format in the skip message."""
    Image.init()
    prefix = data[:16]
    for name, (_, accept) in Image.OPEN.items():
        if accept is None:  # a plugin with no magic number: only trying to open it would tell
            continue
        try:
            found = accept(prefix)
        except Exception:  # a plugin's test on too few bytes
            continue
        if found and not isinstance(found, str):  # a string is a plugin's "maybe, but ..." warning
            return name
    return None


def decode_image(data: bytes, draft: DraftSize | None = None, policy: ImagePolicy = DEFAULT_POLICY) -> Image.Image:
    """The image as RGB, decoded now, so a truncated file fails here and not in a worker later.

    Only `policy.formats` are tried, by content (`bad_image_format` when the bytes are another
    format), and an image over `policy.max_pixels` is refused from its header (`too_many_pixels`).
    With `draft`, a JPEG at least twice the size it asks for (both sides) is decoded at 1/2,
    1/4 or 1/8 scale by libjpeg's DCT scaling, never below that size: much less work for a
    large photo bound for a 336 px view, and pixels close to, not equal to, a full decode
    resampled (see tests/data/test_decode.py for the tolerance). Any other image decodes
    exactly as without it.
    """
    try:
        with warnings.catch_warnings():  # our budget is below Pillow's: its warning would only repeat ours
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=policy.formats)
    except Image.DecompressionBombError as error:  # over twice Pillow's own limit
        raise SampleError("too_many_pixels", f"image over Pillow's pixel limit ({error})") from error
    except Exception as error:  # PIL raises many types for bad bytes
        found = sniff_format(data)
        if found is not None and found not in policy.formats:
            allowed = ", ".join(policy.formats)
            raise SampleError("bad_image_format", f"the image is {found}; the data config allows {allowed}") from error
        raise SampleError("bad_image", f"image does not decode ({error})") from error
    width, height = image.size
    if width * height > policy.max_pixels:
        raise SampleError(
            "too_many_pixels", f"a {width} x {height} image is over the budget of {policy.max_pixels} pixels"
        )
    if width < 1 or height < 1:
        raise SampleError("bad_image", f"a {width} x {height} image has no pixels")
    try:
        if draft is not None and image.format == "JPEG":
            wanted = draft(width, height)
            if wanted is not None:
                w, h = max(1, int(wanted[0])), max(1, int(wanted[1]))
                if min(width // w, height // h) >= 2:
                    image.draft(None, (w, h))
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB image
    except Exception as error:
        raise SampleError("bad_image", f"image does not decode ({error})") from error


def decode_sample(
    raw: dict, draft: DraftSize | None = None, policy: ImagePolicy = DEFAULT_POLICY
) -> tuple[dict, list[Image.Image]]:
    """Returns the sample's JSON record (or {} if none) and its images in order.

    Images are the members `jpg`, `1.jpg`, `2.png` ...: an optional index before the
    extension orders them, so several images per sample stay in their `<image>` order. A member
    named as another image format (`gif`, `bmp` ...) is an image too, decoded only if the policy
    allows its real format (`bad_image_format` otherwise).
    `draft` lets large JPEGs decode at a reduced scale (see `decode_image`). The record is
    checked only as JSON here (an object, not too deep); its fields are the views' business.
    """
    record: dict = {}
    text: str | None = None
    images: list[tuple[int, Image.Image]] = []
    for suffix, value in raw.items():
        if suffix.startswith("__"):
            continue
        if suffix == "json":
            record = parse_object(value)  # bad_json / too_deep / not_an_object
        elif suffix == "txt":
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError as error:
                raise SampleError("bad_text", "text member is not UTF-8") from error
        elif match := IMAGE_MEMBER.match(suffix) or OTHER_IMAGE_MEMBER.match(suffix):
            images.append((int(match.group(1) or 0), decode_image(value, draft, policy)))
        # anything else (.pyd, .pickle, .pth, .npy ...) is never decoded
    if text is not None and "caption" not in record:
        record["caption"] = text.strip()  # img2dataset's layout: the caption is the .txt
    return record, [image for _, image in sorted(images, key=lambda item: item[0])]


def describe(raw: dict) -> str:
    """Where a raw sample came from, for skip messages: its key, its shard (or JSON file) and,
    from a JSON file, its record number."""
    where = f"sample {raw.get('__key__')!r} of {raw.get('__url__')}"
    return where if raw.get("__index__") is None else f"{where} (#{raw['__index__']})"


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
