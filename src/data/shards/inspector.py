"""The shard inspector: counts over any shard set, read exactly as training reads it (webdataset's tar
reader and the kit's safe decoder), so a broken or unsafe set shows before a run meets it: member
types (unsafe ones counted, never decoded), images per sample, fields, corrupt samples by reason,
shard errors, `sizes.json` mismatches and, with a tokenizer, token-length statistics of a view and
a rendering of its supervised spans."""

from __future__ import annotations

import math
import sys
from collections import Counter
from itertools import groupby
from typing import Any

from src.data.conversation import IGNORE_INDEX, IMAGE_TAG, SampleError
from src.data.decode import IMAGE_MEMBER, SkipCounter, decode_sample, describe
from src.data.records import check_fields, check_images
from src.data.shards.writer import format_counts

# webdataset's default decoders unpickle or torch.load these; our reader never decodes them
UNSAFE_EXTENSIONS = ("pyd", "pickle", "pkl", "pth")
MEMBER_TYPES = ("jpg", "png", "webp", "json", "txt", "unsafe", "other")


def member_type(suffix: str) -> str:
    """How the reader treats a member: an image it decodes, json, txt, unsafe or other."""
    if match := IMAGE_MEMBER.match(suffix):  # exactly the members decode_sample reads as images
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
        lines.append(f"unsafe members, never decoded: {format_counts(report['unsafe'])}")
    histogram = report["images_per_sample"]
    lines.append("images per sample: " + ", ".join(f"{n}: {histogram[n]}" for n in sorted(histogram)))
    lines.append(f"text-only samples: {report['text_only']}")
    lines.append("fields: " + ", ".join(f"{f} {report['fields'][f]}" for f in ("conversations", "caption", "mc")))
    lines.append(f"corrupt samples: {format_counts(report['corrupt']) if report['corrupt'] else 'none'}")
    for error in report["shard_errors"]:
        lines.append(f"shard error: {error}")
    if report["unencodable"]:
        lines.append(f"not encodable ({view} view): {format_counts(report['unencodable'])}")
    if (stats := report["tokens"]) is not None:
        lines.append(
            f"tokens ({view} view, {template}, {image_tokens} per image, {stats['count']} examples): "
            f"min {stats['min']} / mean {stats['mean']} / p50 {stats['p50']} / p95 {stats['p95']} / max {stats['max']}; "
            f"{stats['over_max_length']} over max_length {max_length}"
        )
    for rendered in report["rendered"]:
        lines.append(f"sample {rendered}")
    return "\n".join(lines)
