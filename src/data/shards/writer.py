"""The shard writer: LLaVA records (`id`, `image` or `images`, `conversations`) -> WebDataset shards
the training reader streams, per sample a `json` member and the image bytes. What the reader would
reject is skipped here, counted by reason, so a conversion never dies on the 400,000th record and a
training run never meets a sample it cannot use.

Decisions, each for a reason:
- The `json` member is the input record unchanged, image paths included: they are
  provenance (which source file this was) and nothing reads them back, since the images
  travel as members.
- Image bytes are copied as they are, named by the format the bytes hold (a PNG saved as
  `.jpg` becomes a `png` member), because re-encoding JPEGs loses quality and time. Formats
  the reader does not take (GIF, BMP, TIFF ...; a GIF's first frame) are re-encoded to
  lossless PNG rather than dropped: OCR-VQA in LLaVA's mix holds GIFs under `.jpg` names.
- Every image is decoded once with the reader's own decoder, so what is written reads.
- Image paths must stay inside the image folder (no absolute paths, no `..`); symlinks are
  followed, since LLaVA's data folders are often links.
- Keys keep letters, digits, `_` and `-` (a dot would split a sample in webdataset's
  grouping), at most 64 characters, and gain `_1`, `_2` ... when taken.
- A run replaces the set `{prefix}-NNNNNN.tar`: higher-numbered shards of an earlier, longer
  run are removed (and listed), so a glob never mixes two conversions. A run that writes no
  sample at all touches nothing.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from src.data.conversation import SampleError
from src.data.decode import MAX_PIXELS, ImagePolicy, SkipCounter
from src.data.inputs import WRITER_POLICY, load_image
from src.data.records import llava_record, read_sizes_table

BLOCK = 512  # a tar header, and the unit member data is padded to
RECORD = 20 * BLOCK  # tarfile pads a closed archive to whole records of 10 KiB
MAX_KEY_LENGTH = 64  # keeps member names under tar's 100-byte field: one header block each
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


# ---------------------------------------------------------------- keys and shards


class KeyMaker:
    """Unique, dot-free sample keys from record ids, in input order."""

    def __init__(self) -> None:
        self.used: set[str] = set()
        self._next: Counter[str] = Counter()

    def __call__(self, record_id: object, index: int) -> str:
        base = str(record_id) if isinstance(record_id, (str, int)) else ""
        base = _KEY_UNSAFE.sub("_", base)[:MAX_KEY_LENGTH] or f"sample{index}"
        key = base
        while key in self.used:
            self._next[base] += 1
            key = f"{base}_{self._next[base]}"
        self.used.add(key)
        return key


def member_bytes(size: int) -> int:
    """Bytes a member of `size` data bytes takes in a tar: one header block and padded data."""
    return BLOCK + math.ceil(size / BLOCK) * BLOCK


def tar_bytes(content: int) -> int:
    """The size of a closed tar whose members take `content` bytes (end blocks, record padding)."""
    return math.ceil((content + 2 * BLOCK) / RECORD) * RECORD


class ShardSink:
    """Writes samples to `{prefix}-000000.tar` ..., starting a new shard before adding a
    sample would pass `max_count` samples or `max_size` bytes. A sample larger than
    `max_size` on its own gets a shard of its own (counted in `oversized`).

    Shards are written under a `.partial` name and renamed when complete, so an interrupted
    run leaves no shard that looks whole.
    """

    def __init__(self, out: Path, prefix: str, max_count: int, max_size: int) -> None:
        if max_count < 1 or max_size < 1:
            raise ValueError("max_count and max_size must be positive")
        self.out, self.prefix, self.max_count, self.max_size = out, prefix, max_count, max_size
        self.sizes: dict[str, int] = {}
        self.oversized = 0
        self._writer = None
        self._stream = None
        self._name = ""
        self._count = 0
        self._bytes = 0

    def write(self, sample: dict[str, Any]) -> None:
        size = sum(member_bytes(len(v)) for k, v in sample.items() if not k.startswith("__"))
        full = self._count + 1 > self.max_count or tar_bytes(self._bytes + size) > self.max_size
        if self._writer is not None and full:
            self._finish()
        if self._writer is None:
            self._start()
        if tar_bytes(size) > self.max_size:
            self.oversized += 1
        self._writer.write(sample)
        self._count += 1
        self._bytes += size

    def _start(self) -> None:
        import webdataset as wds

        self._name = f"{self.prefix}-{len(self.sizes):06d}.tar"
        self._stream = open(self.out / f"{self._name}.partial", "wb")
        # mtime 0 gives the same bytes each run; an int, since a float mtime makes tarfile add
        # a 1 KiB PAX header ("mtime=0.0") before every member
        self._writer = wds.TarWriter(self._stream, encoder=False, mtime=0)
        self._count = self._bytes = 0

    def _finish(self) -> None:
        self._writer.close()
        self._stream.close()
        os.replace(self.out / f"{self._name}.partial", self.out / self._name)
        self.sizes[self._name] = self._count
        self._writer = self._stream = None

    def close(self) -> None:
        if self._writer is not None:
            self._finish()

    def abort(self) -> None:
        if self._writer is not None:
            self._stream.close()
            (self.out / f"{self._name}.partial").unlink(missing_ok=True)
            self._writer = self._stream = None


def _shard_name(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(prefix)}-(\d{{6}})\.tar$")


def update_sizes(out: Path, prefix: str, sizes: dict[str, int]) -> None:
    """Replace this prefix's entries in `out/sizes.json`, keeping every other set's."""
    path = out / "sizes.json"
    table = read_sizes_table(path) if path.is_file() else {}
    own = _shard_name(prefix)
    table = {name: n for name, n in table.items() if not own.match(name)} | sizes
    path.write_text(json.dumps(dict(sorted(table.items())), indent=1) + "\n")


def _remove_stale(out: Path, prefix: str, written: int) -> list[str]:
    own = _shard_name(prefix)
    stale = sorted(p.name for p in out.iterdir() if (m := own.match(p.name)) and int(m.group(1)) >= written)
    for name in stale:
        (out / name).unlink()
    return stale


# ---------------------------------------------------------------- writing


def build_sample(record: Any, image_root: Path, policy: ImagePolicy = WRITER_POLICY) -> tuple[dict[str, bytes], int]:
    """The tar members of one record (no key yet) and how many images were re-encoded;
    raises SampleError. The record is checked first (`records.llava_record`: the checks the
    stream makes), so a bad record costs no image reads."""
    checked = llava_record(record)
    sample = {"json": json.dumps(checked.record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")}
    reencoded = 0
    for index, relative in enumerate(checked.image_paths):
        data, ext, converted = load_image(image_root / relative, policy)
        sample[ext if len(checked.image_paths) == 1 else f"{index}.{ext}"] = data
        reencoded += converted
    return sample, reencoded


def _record_name(record: Any, index: int, source: str | None) -> str:
    """Which input record a skip is about: its number, its id when it has one, and the file."""
    name = f"record {index}"
    if isinstance(record, dict) and isinstance(record.get("id"), (str, int)) and not isinstance(record["id"], bool):
        name += f" (id {str(record['id'])[:100]!r})"
    return name + (f" of {source}" if source else "")


def write_shards(
    records: Iterable[Any],
    image_root: Path | str,
    out: Path | str,
    prefix: str = "train",
    max_count: int = 10000,
    max_size: int = int(3e9),
    limit: int | None = None,
    total: int | None = None,
    progress: bool = False,
    source: str | None = None,
    max_pixels: int = MAX_PIXELS,
) -> dict:
    """Write records as shards in input order; returns (and saves as `{prefix}-summary.json`)
    what was written and what was skipped, by reason.

    `records` may hold `SampleError`s (lines that did not parse); they are counted as skips.
    `limit` stops after that many input records, skipped ones included. `source` names the
    input file in skip messages. `max_pixels` is the image budget (the reader's default).
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    image_root, out = Path(image_root), Path(out)
    policy = ImagePolicy(WRITER_POLICY.formats, max_pixels)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "sizes.json").is_file():
        read_sizes_table(out / "sizes.json")  # a broken table stops us now, not after hours of writing
    sink = ShardSink(out, prefix, max_count, int(max_size))
    skips = SkipCounter()
    counts: Counter[str] = Counter()
    total = min(total, limit) if total is not None and limit is not None else (total or limit)
    keys = KeyMaker()
    with ExitStack() as stack:
        if progress:  # skip warnings go through tqdm, so they do not break the bar's line
            stack.enter_context(logging_redirect_tqdm())
        bar = stack.enter_context(tqdm(total=total, unit=" records", file=sys.stderr, disable=not progress))
        try:
            for index, record in enumerate(records):
                if limit is not None and index >= limit:
                    break
                counts["records"] += 1
                bar.update()
                try:
                    members, reencoded = build_sample(record, image_root, policy)
                except SampleError as error:
                    skips.skip(error.reason, f"{_record_name(record, index, source)}: {error}")
                    continue
                sink.write({"__key__": keys(record.get("id"), index), **members})
                images = len(members) - 1  # all but the json
                counts["samples"] += 1
                counts["images"] += images
                counts["text_only"] += images == 0
                counts["reencoded"] += reencoded
            sink.close()
        except BaseException:
            sink.abort()  # no half-written shard is left under a final name
            raise
    removed: list[str] = []
    if sink.sizes:  # a run that wrote nothing (a wrong --images, say) leaves the old set whole
        update_sizes(out, prefix, sink.sizes)
        removed = _remove_stale(out, prefix, len(sink.sizes))
    summary = {
        "records": counts["records"],
        "samples": counts["samples"],
        "images": counts["images"],
        "text_only": counts["text_only"],
        "reencoded": counts["reencoded"],
        "shards": len(sink.sizes),
        "sizes": sink.sizes,
        "skipped": dict(sorted(skips.total.items())),
        "oversized": sink.oversized,
        "removed_stale": removed,
    }
    (out / f"{prefix}-summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def format_summary(summary: dict, out: Path | str, prefix: str) -> str:
    lines = [
        f"read {summary['records']} records; wrote {summary['samples']} samples "
        f"({summary['images']} images, {summary['text_only']} text-only, {summary['reencoded']} re-encoded to png) "
        f"in {summary['shards']} shards to {out}"
    ]
    skipped = summary["skipped"]
    lines.append(f"skipped {sum(skipped.values())}" + (": " + format_counts(skipped) if skipped else ""))
    if summary["oversized"]:
        lines.append(f"{summary['oversized']} samples exceed max-size alone and have a shard each")
    if summary["removed_stale"]:
        lines.append(f"removed shards of an earlier run: {', '.join(summary['removed_stale'])}")
    lines.append(f"summary: {Path(out) / f'{prefix}-summary.json'}")
    return "\n".join(lines)


def format_counts(counter: dict) -> str:
    """`reason n, reason n` in sorted order: the skip and corruption tallies of both reports."""
    return ", ".join(f"{key} {n}" for key, n in sorted(counter.items()))
