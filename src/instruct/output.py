"""Outputs from the ledger: LLaVA records (JSON or JSONL), WebDataset shards, and the summary.

They are rebuilt whole from the ledger and the input after every run, in input order (image
by image, kinds in the configured order), so a resumed run's outputs hold the same samples in
the same order as an uninterrupted one's, and nothing depends on which reply came back first.

A record is LLaVA's `{"id", "image", "conversations"}` plus `kind` and `source_id`. Shards
are written by the kit's own writer (`src.data.shards.write_shards`): the same checks, keys,
`sizes.json` and summary as any converted data set, ready for stage 2. For a shard input the
images are first extracted to `out/images/` (once per image), so the JSON is a complete LLaVA
data set too.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from src.core.chat_client import ChatConfig
from src.data.shards import write_shards
from src.instruct.config import GenerateConfig
from src.instruct.generate import RunStats
from src.instruct.ledger import Ledger
from src.instruct.sources import Source


def llava_records(config: GenerateConfig, source: Source, ledger: Ledger, image_dir: Path | None) -> Iterator[dict]:
    """The ok samples in input order; for a shard input each used image is written to image_dir."""
    ok = ledger.ok()
    names: set[str] = set()
    for index, item in enumerate(source):
        if config.limit is not None and index >= config.limit:
            break
        entries = [(kind, ok[(item.id, kind)]) for kind in config.kinds_for(index) if (item.id, kind) in ok]
        if not entries:
            continue
        image = item.image
        if item.data is not None and image_dir is not None:
            stem, ext = image.rsplit(".", 1)
            number = 0
            while image in names:  # two keys that sanitise to one name
                number += 1
                image = f"{stem}_{number}.{ext}"
            names.add(image)
            path = image_dir / image
            if not path.is_file() or path.stat().st_size != len(item.data):
                _write_atomic(path, item.data)
        for kind, entry in entries:
            yield {
                "id": f"{item.id}_{kind}",
                "image": image,
                "conversations": entry["conversations"],
                "kind": kind,
                "source_id": item.id,
            }


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


class _RecordWriter:
    """Writes records as they pass (a JSON list or JSONL) to a `.partial` file, renamed on close."""

    def __init__(self, path: Path, jsonl: bool) -> None:
        self.path, self.jsonl, self.count = path, jsonl, 0
        self.kinds: Counter[str] = Counter()
        self.partial = path.with_name(path.name + ".partial")
        self.stream = open(self.partial, "w", encoding="utf-8")
        if not jsonl:
            self.stream.write("[")

    def __call__(self, records: Iterator[dict]) -> Iterator[dict]:
        for record in records:
            text = json.dumps(record, ensure_ascii=False)
            if self.jsonl:
                self.stream.write(text + "\n")
            else:
                self.stream.write(("\n" if not self.count else ",\n") + text)
            self.count += 1
            self.kinds[record["kind"]] += 1
            yield record

    def close(self) -> None:
        if not self.jsonl:
            self.stream.write("\n]\n")
        self.stream.close()
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        self.stream.close()
        self.partial.unlink(missing_ok=True)


def write_outputs(config: GenerateConfig, source: Source, ledger: Ledger) -> dict:
    """Write {prefix}.json(l) and, unless turned off, the shards; returns what was written."""
    out = Path(config.out)
    image_dir = None
    if config.shards:
        image_dir = out / "images"
        image_dir.mkdir(parents=True, exist_ok=True)
    image_root = image_dir if image_dir is not None else Path(config.images)
    json_path = out / f"{config.prefix}.{'jsonl' if config.jsonl else 'json'}"
    writer = _RecordWriter(json_path, config.jsonl)
    result: dict = {"json": str(json_path)}
    try:
        records = writer(llava_records(config, source, ledger, image_dir))
        if config.write_shards:
            summary = write_shards(
                records, image_root, out / "shards", prefix=config.prefix, max_count=config.max_count,
                max_size=int(config.max_size), progress=config.progress,
            )  # fmt: skip
            result["shards"] = {k: summary[k] for k in ("samples", "shards", "images", "skipped", "removed_stale")}
            result["shards"]["folder"] = str(out / "shards")
        else:
            for _ in records:
                pass
    except BaseException:
        writer.abort()
        raise
    writer.close()
    result["records"] = writer.count
    result["records_by_kind"] = {kind: writer.kinds[kind] for kind in config.kinds}
    return result


def summarize(
    config: GenerateConfig,
    ledger: Ledger,
    stats: RunStats,
    usage: dict,
    outputs: dict,
    input_skips: dict,
    boxes_dropped: dict | None = None,
) -> dict:
    """Counts over the whole ledger (every run so far) and this run's requests."""
    teacher: ChatConfig = config.teacher
    final = [entry for key, entry in ledger.entries.items() if key[1] in config.kinds]
    samples = outputs["records_by_kind"]  # what was written (limits applied)
    failed = Counter(entry["status"] for entry in final if entry["status"] != "ok")
    rejections: Counter[str] = Counter()
    tokens: Counter[str] = Counter()
    for entry in ledger.history:  # every attempt of every run, failures included
        rejections.update(entry.get("rejections") or {})
        tokens["prompt"] += entry.get("prompt_tokens", 0)
        tokens["completion"] += entry.get("completion_tokens", 0)
    cost = tokens["prompt"] / 1000 * teacher.price_prompt_per_1k
    cost += tokens["completion"] / 1000 * teacher.price_completion_per_1k
    return {
        "samples": {kind: samples[kind] for kind in config.kinds} | {"total": sum(samples.values())},
        "failed": dict(sorted(failed.items())),
        "rejections": dict(sorted(rejections.items())),
        "tokens": dict(tokens),
        "estimated_cost": round(cost, 4),
        "input_skipped": input_skips,
        "input_boxes_dropped": boxes_dropped or {},
        "this_run": {
            "jobs": stats.jobs,
            "already_done": stats.skipped_done,
            "ok": stats.ok,
            "rejected": stats.rejected,
            "error": stats.error,
            "elapsed_s": stats.elapsed_s,
            "samples_per_s": round(stats.ok / stats.elapsed_s, 3) if stats.elapsed_s else None,
            "requests": usage["requests"],
            "retries": usage["retries"],
            "retry_reasons": usage["retry_reasons"],
            "failures": usage["failures"],
        },
        "outputs": outputs,
    }


def format_summary(summary: dict) -> str:
    samples = summary["samples"]
    run = summary["this_run"]
    lines = [
        f"samples: {samples['total']} ("
        + ", ".join(f"{k} {v}" for k, v in samples.items() if k != "total")
        + ")"
        + (f"; failed: {_counts(summary['failed'])} (a rerun retries them)" if summary["failed"] else ""),
        f"rejected replies: {_counts(summary['rejections']) if summary['rejections'] else 'none'}",
        f"tokens: {summary['tokens'].get('prompt', 0)} prompt, {summary['tokens'].get('completion', 0)} completion; "
        f"estimated cost {summary['estimated_cost']}",
        f"this run: {run['ok']} new samples in {run['elapsed_s']} s ({run['already_done']} already done), "
        f"{run['requests']} requests, {run['retries']} retries"
        + (f" ({_counts(run['retry_reasons'])})" if run["retry_reasons"] else ""),
    ]
    if summary["input_skipped"]:
        lines.append(f"input items skipped: {_counts(summary['input_skipped'])}")
    if summary.get("input_boxes_dropped"):
        lines.append(f"input boxes dropped (their images kept): {_counts(summary['input_boxes_dropped'])}")
    outputs = summary["outputs"]
    lines.append(f"records: {outputs['records']} in {outputs['json']}")
    if "shards" in outputs:
        shards = outputs["shards"]
        skipped = f", skipped {_counts(shards['skipped'])}" if shards["skipped"] else ""
        lines.append(f"shards: {shards['samples']} samples in {shards['shards']} shards in {shards['folder']}{skipped}")
    return "\n".join(lines)


def _counts(counter: dict) -> str:
    return ", ".join(f"{key} {n}" for key, n in sorted(counter.items()))
