"""What the teacher is shown of each image: its captions and its object boxes, from three inputs.

- COCO annotations: a captions file (`captions_train2017.json`) and, optionally, an instances
  file (`instances_train2017.json`); boxes are COCO's `[x, y, width, height]` in pixels.
- One JSON list (or JSONL) of `{"id"?, "image", "captions" | "caption", "boxes"?, "width"?,
  "height"?}`, boxes as `{"category": "dog", "bbox": [x1, y1, x2, y2]}` in pixels (the image
  size from `width`/`height` or the image file's header), or already in 0-1 with
  `boxes_normalized`.
- A caption shard set (img2dataset's layout or the kit's: an image member and a `txt` caption
  and/or a `json` record with `caption`/`captions`/`boxes`), read with webdataset's tar reader
  only: members are never decoded by webdataset, so nothing is unpickled.

Every box becomes `Box(category, x1, y1, x2, y2)` in 0-1 of the image's width and height,
clamped to the image. Bad records are skipped and counted by reason (`SkipCounter`), never
fatal: an item without captions, a missing image file, a box that is not four numbers, a
repeated id. A box with no area once clamped (zero width or height, or wholly outside the
image: COCO has a few) is dropped on its own and counted in `boxes_dropped`; its image keeps
its captions and its other boxes.

Captions keep the input's order (for COCO, the order of the captions file's annotations) and
all of them are kept; only their whitespace is normalised (a caption with a line break would
otherwise read as two).
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from src.data.conversation import SampleError
from src.data.decode import IMAGE_MEMBER, SkipCounter

log = logging.getLogger(__name__)
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
LOG_FIRST = 3  # dropped boxes logged as warnings; the rest are only counted


@dataclass(frozen=True)
class Box:
    category: str
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass
class Item:
    """One image as the teacher sees it. `image` is its path relative to the image folder (or,
    for a shard input, the member name it is extracted under); `data` holds the image bytes
    when they came from a shard."""

    id: str
    image: str
    captions: list[str]
    boxes: list[Box] = field(default_factory=list)
    data: bytes | None = None


class ItemError(ValueError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class DegenerateBox(ItemError):
    """A well-formed box with no area inside the image: only the box is dropped."""

    def __init__(self, message: str) -> None:
        super().__init__("no_area", message)


def normalize_box(category: Any, xyxy: Any, width: float | None, height: float | None) -> Box:
    """A pixel (or, with width = height = None, already 0-1) `[x1, y1, x2, y2]` box in 0-1."""
    if not isinstance(category, str) or not category.strip():
        raise ItemError("bad_box", f"category must be a non-empty string, got {category!r}")
    if (
        not isinstance(xyxy, (list, tuple))
        or len(xyxy) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xyxy)
    ):
        raise ItemError("bad_box", f"a box must be four numbers, got {xyxy!r}")
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    if width is not None:
        if not width or not height or width <= 0 or height <= 0:
            raise ItemError("bad_box", f"image size {width}x{height} cannot normalise a box")
        x1, x2, y1, y2 = x1 / width, x2 / width, y1 / height, y2 / height
    x1, y1, x2, y2 = (min(1.0, max(0.0, v)) for v in (x1, y1, x2, y2))
    if x2 <= x1 or y2 <= y1:
        raise DegenerateBox(f"{category} box {list(xyxy)} has no area inside the image")
    return Box(category.strip(), x1, y1, x2, y2)


def _captions(record: dict) -> list[str]:
    value = record.get("captions", record.get("caption"))
    captions = [value] if isinstance(value, str) else value
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise ItemError("no_captions", f"captions must be a string or a list of strings, got {value!r}")
    captions = [" ".join(c.split()) for c in captions if c.strip()]
    if not captions:
        raise ItemError("no_captions", "the item has no caption")
    return captions


def _safe_relative(path: str) -> str:
    if not isinstance(path, str) or not path or PurePath(path).is_absolute() or ".." in PurePath(path).parts:
        raise ItemError("bad_image_path", f"{path!r} is not a path inside the image folder")
    return path


def _image_size(path: Path | None = None, data: bytes | None = None) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path if path is not None else io.BytesIO(data)) as image:  # reads the header only
            return image.size
    except Exception as error:  # PIL raises many types for bad bytes
        raise ItemError("bad_image", f"cannot read the image size ({error})") from error


def _boxes(record: dict, normalized: bool, size, drop) -> list[Box]:
    """`size` is a callable giving (width, height), called only when a pixel box needs it;
    `drop(error)` is told of each degenerate box left out."""
    raw = record.get("boxes") or []
    if not isinstance(raw, list):
        raise ItemError("bad_box", f"boxes must be a list, got {type(raw).__name__}")
    width = height = None
    if raw and not normalized:
        width, height = record.get("width"), record.get("height")
        if not width or not height:
            width, height = size()
    boxes = []
    for box in raw:
        if not isinstance(box, dict):
            raise ItemError("bad_box", f"a box must be an object with category and bbox, got {box!r}")
        category = box.get("category", box.get("label", box.get("name")))
        try:
            boxes.append(normalize_box(category, box.get("bbox", box.get("box")), width, height))
        except DegenerateBox as error:
            drop(error)
    return boxes


class Source:
    """Items in input order; `total` is their number when known up front. Iterating again
    yields the same items (the output pass re-reads the input)."""

    total: int | None = None

    def __init__(self) -> None:
        self.skips = SkipCounter()
        self.boxes_dropped: Counter[str] = Counter()
        self._dropped: list[DegenerateBox] = []  # of the item being built

    def _drop_box(self, error: DegenerateBox) -> None:
        self._dropped.append(error)

    def __iter__(self) -> Iterator[Item]:
        self.skips = SkipCounter()
        self.boxes_dropped = Counter()
        seen: set[str] = set()
        for index, produce in enumerate(self._raw()):
            self._dropped = []
            try:
                item = produce()
            except ItemError as error:
                self.skips.skip(error.reason, f"item {index}: {error}")
                continue
            if item.id in seen:
                self.skips.skip("duplicate_id", f"item {index}: id {item.id!r} was seen before")
                continue
            seen.add(item.id)
            for error in self._dropped:  # counted only for items kept: a skipped item's boxes are moot
                self.boxes_dropped[error.reason] += 1
                if self.boxes_dropped[error.reason] <= LOG_FIRST:
                    log.warning("dropped a box of item %r: %s", item.id, error)
            yield item

    def _raw(self) -> Iterator[Any]:
        """Yields callables that build one Item or raise ItemError (so errors are per item)."""
        raise NotImplementedError


class CocoSource(Source):
    """COCO captions (+ instances) files; ids are COCO's image ids."""

    def __init__(self, captions: Path | str, instances: Path | str | None, images: Path | str) -> None:
        super().__init__()
        self.images = Path(images)
        data = json.loads(Path(captions).read_text())
        self._images = data.get("images", [])
        self._captions: dict[Any, list[str]] = defaultdict(list)
        for annotation in data.get("annotations", []):
            self._captions[annotation.get("image_id")].append(annotation.get("caption", ""))
        self._boxes: dict[Any, list[dict]] = defaultdict(list)
        self._categories: dict[Any, str] = {}
        if instances is not None:
            data = json.loads(Path(instances).read_text())
            self._categories = {c["id"]: c["name"] for c in data.get("categories", [])}
            for annotation in data.get("annotations", []):
                self._boxes[annotation.get("image_id")].append(annotation)
        self.total = len(self._images)

    def _raw(self) -> Iterator[Any]:
        for image in self._images:
            yield lambda image=image: self._item(image)

    def _item(self, image: dict) -> Item:
        name = _safe_relative(image.get("file_name"))
        if not (self.images / name).is_file():
            raise ItemError("missing_image", f"{self.images / name} is not a file")
        captions = _captions({"captions": self._captions.get(image.get("id"), [])})
        width, height = image.get("width"), image.get("height")
        boxes = []
        for annotation in self._boxes.get(image.get("id"), []):
            bbox = annotation.get("bbox")
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise ItemError("bad_box", f"COCO bbox must be [x, y, w, h], got {bbox!r}")
            x, y, w, h = bbox
            category = self._categories.get(annotation.get("category_id"))
            try:
                boxes.append(normalize_box(category, [x, y, x + w, y + h], width, height))
            except DegenerateBox as error:
                self._drop_box(error)
        return Item(str(image.get("id")), name, captions, boxes)


class RecordSource(Source):
    """A JSON list (or JSONL) of `{id?, image, captions|caption, boxes?, width?, height?}`."""

    def __init__(self, path: Path | str, images: Path | str, boxes_normalized: bool = False) -> None:
        super().__init__()
        from src.data.inputs import read_records

        self.path, self.images, self.normalized = Path(path), Path(images), boxes_normalized
        _, self.total = read_records(self.path)

    def _raw(self) -> Iterator[Any]:
        from src.data.inputs import read_records

        records, _ = read_records(self.path)
        for record in records:
            yield lambda record=record: self._item(record)

    def _item(self, record: Any) -> Item:
        if isinstance(record, SampleError):  # a JSONL line that does not parse
            raise ItemError(record.reason, str(record))
        if not isinstance(record, dict):
            raise ItemError("not_an_object", f"a record must be a JSON object, got {type(record).__name__}")
        name = _safe_relative(record.get("image"))
        path = self.images / name
        if not path.is_file():
            raise ItemError("missing_image", f"{path} is not a file")
        item_id = record.get("id", name)
        if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
            raise ItemError("bad_id", f"id must be a string or an integer, got {item_id!r}")
        boxes = _boxes(record, self.normalized, lambda: _image_size(path=path), self._drop_box)
        return Item(str(item_id), name, _captions(record), boxes)


class ShardSource(Source):
    """A caption shard set; ids are the samples' keys. Exactly one image per sample."""

    def __init__(self, shards: str | list[str], boxes_normalized: bool = False) -> None:
        super().__init__()
        from braceexpand import braceexpand

        patterns = [shards] if isinstance(shards, str) else list(shards)
        self.urls = [url for pattern in patterns for url in braceexpand(pattern)]
        self.normalized = boxes_normalized

    def _raw(self) -> Iterator[Any]:
        from webdataset.tariterators import tarfile_samples

        for url in self.urls:
            errors: list[str] = []

            def on_error(error: Exception, errors: list[str] = errors) -> bool:
                errors.append(repr(error))
                return True

            for raw in tarfile_samples(iter([{"url": url}]), handler=on_error):
                yield lambda raw=raw: self._item(raw)
            if errors:  # a cut or unreadable tar: what it held before the damage was read
                self.skips.skip("shard_error", f"{url}: {errors[0]}")

    def _item(self, raw: dict) -> Item:
        record: dict = {}
        images = [(suffix, value) for suffix, value in raw.items() if IMAGE_MEMBER.match(suffix)]
        if "json" in raw:
            try:
                record = json.loads(raw["json"])
            except (UnicodeDecodeError, ValueError) as error:
                raise ItemError("bad_json", f"JSON does not parse ({error})") from error
            if not isinstance(record, dict):
                raise ItemError("bad_json", "the JSON member is not an object")
        if "caption" not in record and "captions" not in record and "txt" in raw:
            try:
                record["caption"] = raw["txt"].decode("utf-8")
            except UnicodeDecodeError as error:
                raise ItemError("bad_text", "text member is not UTF-8") from error
        if len(images) != 1:
            raise ItemError("not_one_image", f"a sample needs exactly one image member, it has {len(images)}")
        suffix, data = images[0]
        key = str(raw.get("__key__"))
        boxes = _boxes(record, self.normalized, lambda: _image_size(data=data), self._drop_box)
        name = f"{_UNSAFE.sub('_', key)}.{suffix.rsplit('.', 1)[-1]}"  # a flat, safe file name
        return Item(key, name, _captions(record), boxes, data=data)
