"""LLaVA-format JSON to WebDataset shards, and a report on any shard set before training on it.

    python -m src.data.shards write --json llava_v1_5_mix665k.json --images playground/data \\
        --out /data/llava665k --prefix train
    python -m src.data.shards inspect '/data/llava665k/train-{000000..000066}.tar' \\
        --tokenizer lmsys/vicuna-7b-v1.5 --image-tokens 576

`write` turns a list of LLaVA records (`id`, `image` or `images`, `conversations`) into
shards the training reader streams: per sample a `json` member and the image bytes. What
the reader would reject is skipped here, counted by reason, so a conversion never dies on
the 400,000th record and a training run never meets a sample it cannot use.

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

import argparse
import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable
from contextlib import ExitStack
from itertools import groupby
from pathlib import Path
from typing import Any

from src.data.conversation import IGNORE_INDEX, IMAGE_TAG, SampleError
from src.data.decode import (
    _IMAGE_SUFFIX,
    MAX_PIXELS,
    ImagePolicy,
    SkipCounter,
    decode_sample,
    describe,
)
from src.data.inputs import CONVERTED_FORMATS, WRITER_POLICY, image_format, load_image, read_records  # noqa: F401  (the writer's API)
from src.data.records import check_fields, check_images, llava_record, read_sizes_table

BLOCK = 512  # a tar header, and the unit member data is padded to
RECORD = 20 * BLOCK  # tarfile pads a closed archive to whole records of 10 KiB
MAX_KEY_LENGTH = 64  # keeps member names under tar's 100-byte field: one header block each
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# webdataset's default decoders unpickle or torch.load these; our reader never decodes them
UNSAFE_EXTENSIONS = ("pyd", "pickle", "pkl", "pth")
MEMBER_TYPES = ("jpg", "png", "webp", "json", "txt", "unsafe", "other")


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
    lines.append(f"skipped {sum(skipped.values())}" + (": " + _counts(skipped) if skipped else ""))
    if summary["oversized"]:
        lines.append(f"{summary['oversized']} samples exceed max-size alone and have a shard each")
    if summary["removed_stale"]:
        lines.append(f"removed shards of an earlier run: {', '.join(summary['removed_stale'])}")
    lines.append(f"summary: {Path(out) / f'{prefix}-summary.json'}")
    return "\n".join(lines)


# ---------------------------------------------------------------- inspecting


def member_type(suffix: str) -> str:
    """How the reader treats a member: an image it decodes, json, txt, unsafe or other."""
    if match := _IMAGE_SUFFIX.match(suffix):  # exactly the members decode_sample reads as images
        return "jpg" if match.group(2) == "jpeg" else match.group(2)
    if suffix in ("json", "txt"):
        return suffix
    return "unsafe" if suffix.rsplit(".", 1)[-1] in UNSAFE_EXTENSIONS else "other"


def _percentile(ordered: list[int], q: float) -> int:
    """Nearest-rank percentile of a sorted list."""
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def length_stats(lengths: list[int], max_length: int) -> dict:
    ordered = sorted(lengths)
    return {
        "count": len(ordered),
        "min": ordered[0],
        "mean": round(sum(ordered) / len(ordered), 1),
        "p50": _percentile(ordered, 50),
        "p95": _percentile(ordered, 95),
        "max": ordered[-1],
        "over_max_length": sum(n > max_length for n in ordered),
    }


def render_tokens(tokenizer, input_ids: list[int], labels: list[int], image_tokens: int) -> str:
    """The encoded text with each image's placeholder run shown as one `<image>` and the
    supervised tokens (those the loss sees) in [[ ]]."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TAG)
    parts = []
    runs = groupby(zip(input_ids, labels, strict=True), key=lambda t: (t[0] == image_id, t[1] != IGNORE_INDEX))
    for (is_image, supervised), run in runs:
        ids = [token for token, _ in run]
        text = IMAGE_TAG * max(1, len(ids) // image_tokens) if is_image else tokenizer.decode(ids)
        parts.append(f"[[{text}]]" if supervised else text)
    return " ".join(parts)


def _builder(tokenizer, template: str, image_tokens: int, view: str):
    import torch

    from src.data.conversation import ConversationEncoder, build_template
    from src.data.samples import ExampleBuilder

    # no truncation: the report measures whole samples and counts those over max_length
    encoder = ConversationEncoder(tokenizer, build_template(template), image_tokens, max_length=sys.maxsize)
    return ExampleBuilder(encoder, lambda image: torch.zeros(3, 1, 1), view)  # pixels unused


def inspect_shards(
    shards: str | list[str],
    tokenizer=None,
    template: str = "vicuna_v1",
    image_tokens: int = 576,
    view: str = "conversations",
    max_length: int = 2048,
    samples: int | None = None,
    show: int = 1,
) -> dict:
    """Counts over a shard set, read as training reads it: webdataset's tar reader and our
    safe decoder (unsafe members are counted, never decoded). Corrupt samples and shard
    errors are counted, not raised. `samples` stops after that many samples."""
    from webdataset.tariterators import tarfile_samples

    from src.data.stream import expand_shards, read_sizes

    urls = expand_shards(shards)
    try:
        expected, sizes_error = read_sizes(urls), None
    except ValueError as error:  # the inspector reports a broken sizes.json instead of stopping at it
        expected, sizes_error = {}, str(error)
    builder = _builder(tokenizer, template, image_tokens, view) if tokenizer is not None else None
    skips = SkipCounter()  # logs the first few samples of each reason, by shard and key
    report: dict[str, Any] = {
        "sizes_error": sizes_error,
        "shards": [],
        "samples": 0,
        "members": Counter(),
        "unsafe": Counter(),
        "images_per_sample": Counter(),
        "text_only": 0,
        "fields": Counter(),
        "corrupt": Counter(),
        "shard_errors": [],
        "unencodable": Counter(),
        "tokens": None,
        "rendered": [],
        "stopped": False,
    }
    lengths: list[int] = []
    for url in urls:
        if samples is not None and report["samples"] >= samples:
            report["stopped"] = True
            break
        errors: list[str] = []

        def on_error(error: Exception, errors: list[str] = errors) -> bool:
            errors.append(repr(error))
            return True  # go on with the next member, as training does

        seen, complete = 0, True
        for raw in tarfile_samples(iter([{"url": url}]), handler=on_error):
            if samples is not None and report["samples"] >= samples:
                report["stopped"], complete = True, False
                break
            seen += 1
            report["samples"] += 1
            _inspect_sample(raw, report, builder, lengths, tokenizer, image_tokens, show, skips)
        if errors:  # webdataset reports one cut tar twice (member, then shard): keep the first
            report["shard_errors"].append(f"{url}: {errors[0]}")
        report["shards"].append({"shard": url, "samples": seen, "expected": expected.get(url), "complete": complete})
    if lengths:
        report["tokens"] = length_stats(lengths, max_length)
    return report


def _inspect_sample(
    raw: dict, report: dict, builder, lengths: list[int], tokenizer, image_tokens: int, show: int,
    skips: SkipCounter,
) -> None:  # fmt: skip
    for suffix in raw:
        if suffix.startswith("__"):
            continue
        kind = member_type(suffix)
        report["members"][kind] += 1
        if kind == "unsafe":
            report["unsafe"][suffix.rsplit(".", 1)[-1]] += 1
    try:
        record, images = decode_sample(raw)
    except SampleError as error:
        report["corrupt"][error.reason] += 1
        skips.skip(error.reason, f"{describe(raw)}: {error}")
        return
    report["images_per_sample"][len(images)] += 1
    report["text_only"] += not images
    report["fields"].update(f for f in ("conversations", "caption", "mc") if record.get(f))
    try:  # every field it carries, as any view would read it, and the images its record declares
        check_fields(record)
        check_images(record, len(images), needs_image=False)
    except SampleError as error:
        report["corrupt"][error.reason] += 1
        skips.skip(error.reason, f"{describe(raw)}: {error}")
        return
    if builder is None:
        return
    try:
        examples = builder(record, images)
    except SampleError as error:
        report["unencodable"][error.reason] += 1
        skips.skip(error.reason, f"{describe(raw)} ({builder.views[0]} view): {error}")
        return
    for example in examples:
        lengths.append(len(example.input_ids))
        if len(report["rendered"]) < show:
            text = render_tokens(tokenizer, example.input_ids.tolist(), example.labels.tolist(), image_tokens)
            report["rendered"].append(f"{raw.get('__key__')} ({raw.get('__url__')}):\n{text}")


def _counts(counter: dict) -> str:
    return ", ".join(f"{key} {n}" for key, n in sorted(counter.items()))


def format_report(
    report: dict,
    view: str = "conversations",
    template: str = "vicuna_v1",
    image_tokens: int = 576,
    max_length: int = 2048,
) -> str:
    lines = [
        f"{len(report['shards'])} shards, {report['samples']} samples"
        + (" (stopped at --samples)" if report["stopped"] else "")
    ]
    if report.get("sizes_error"):
        lines.append(f"sizes.json unusable: {report['sizes_error']}")
    for shard in report["shards"]:
        if shard["expected"] is None:
            note = "not in a sizes.json"
        elif not shard["complete"]:
            note = f"sizes.json: {shard['expected']}, not read to the end"
        elif shard["expected"] == shard["samples"]:
            note = f"sizes.json: {shard['expected']}"
        else:
            note = f"sizes.json: {shard['expected']}, MISMATCH"
        lines.append(f"  {shard['shard']}: {shard['samples']} samples ({note})")
    lines.append("members: " + ", ".join(f"{kind} {report['members'][kind]}" for kind in MEMBER_TYPES))
    if report["unsafe"]:
        lines.append(f"unsafe members, never decoded: {_counts(report['unsafe'])}")
    histogram = report["images_per_sample"]
    lines.append("images per sample: " + ", ".join(f"{n}: {histogram[n]}" for n in sorted(histogram)))
    lines.append(f"text-only samples: {report['text_only']}")
    lines.append("fields: " + ", ".join(f"{f} {report['fields'][f]}" for f in ("conversations", "caption", "mc")))
    lines.append(f"corrupt samples: {_counts(report['corrupt']) if report['corrupt'] else 'none'}")
    for error in report["shard_errors"]:
        lines.append(f"shard error: {error}")
    if report["unencodable"]:
        lines.append(f"not encodable ({view} view): {_counts(report['unencodable'])}")
    if (stats := report["tokens"]) is not None:
        lines.append(
            f"tokens ({view} view, {template}, {image_tokens} per image, {stats['count']} examples): "
            f"min {stats['min']} / mean {stats['mean']} / p50 {stats['p50']} / p95 {stats['p95']} / max {stats['max']}; "
            f"{stats['over_max_length']} over max_length {max_length}"
        )
    for rendered in report["rendered"]:
        lines.append(f"sample {rendered}")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m src.data.shards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="LLaVA JSON/JSONL + image folder -> WebDataset shards")
    write.add_argument("--json", type=Path, required=True, help="LLaVA records: a JSON list or JSONL")
    write.add_argument("--images", type=Path, required=True, help="folder the records' image paths are relative to")
    write.add_argument("--out", type=Path, required=True, help="folder for the shards, sizes.json and the summary")
    write.add_argument("--prefix", default="train", help="shard names: {prefix}-000000.tar ...")
    write.add_argument("--max-count", type=int, default=10000, help="samples per shard at most")
    write.add_argument("--max-size", type=float, default=3e9, help="bytes per shard at most (3e9 accepted)")
    write.add_argument("--limit", type=int, default=None, help="read only the first N records")
    write.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="images over this many pixels are skipped")
    inspect = commands.add_parser("inspect", help="counts, member types and token lengths of a shard set")
    inspect.add_argument("shards", nargs="+", help="shard paths, brace patterns or URLs")
    inspect.add_argument("--tokenizer", default=None, help="tokenizer folder or hub name: adds token-length stats")
    inspect.add_argument("--template", default="vicuna_v1", help="conversation template")
    inspect.add_argument("--image-tokens", type=int, default=576, help="tokens one image becomes")
    inspect.add_argument("--view", default="conversations", help="conversations, caption or mc")
    inspect.add_argument("--max-length", type=int, default=2048, help="count examples longer than this")
    inspect.add_argument("--samples", type=int, default=None, help="read only the first N samples")
    inspect.add_argument("--show", type=int, default=1, help="samples to render with their supervised spans")
    args = parser.parse_args(argv)

    if args.command == "write":
        if args.max_count < 1 or args.max_size < 1 or args.max_pixels < 1:
            parser.error("--max-count, --max-size and --max-pixels must be positive")
        if not args.json.is_file():
            parser.error(f"--json {args.json} is not a file")
        if not args.images.is_dir():
            parser.error(f"--images {args.images} is not a folder")
        try:
            records, total = read_records(args.json)
        except ValueError as error:  # a JSON list that does not parse cannot be skipped around
            parser.error(f"cannot read {args.json}: {error}")
        if (args.out / "sizes.json").is_file():
            try:
                read_sizes_table(args.out / "sizes.json")  # its other sets' entries are kept: it must read
            except ValueError as error:
                parser.error(str(error))
        summary = write_shards(
            records, args.images, args.out, prefix=args.prefix, max_count=args.max_count,
            max_size=int(args.max_size), limit=args.limit, total=total, progress=True, source=str(args.json),
            max_pixels=args.max_pixels,
        )  # fmt: skip
        print(format_summary(summary, args.out, args.prefix))
        return
    from src.data.samples import VIEWS  # imported here: `write` needs no torch

    if args.view not in VIEWS:
        parser.error(f"unknown view {args.view!r}; choose one of {list(VIEWS)}")
    tokenizer = None
    if args.tokenizer is not None:
        from transformers import AutoTokenizer

        from src.data.tokenizer import prepare_tokenizer

        # as training prepares it: a hub tokenizer (Vicuna's) gains `<image>` and a pad token
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(args.tokenizer))
    report = inspect_shards(
        args.shards, tokenizer, template=args.template, image_tokens=args.image_tokens, view=args.view,
        max_length=args.max_length, samples=args.samples, show=args.show,
    )  # fmt: skip
    print(format_report(report, args.view, args.template, args.image_tokens, args.max_length))


if __name__ == "__main__":
    main()
