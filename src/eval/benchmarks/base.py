"""One benchmark = converter + prompt format + answer reader + metric + report, in one registry.

A benchmark reads its official release files into `Question`s (the same function for `convert`
and `score`, so the ids a conversion writes are the ids scoring looks for), writes them as LLaVA
records (a JSON that `predict --data.predict_json` reads, and WebDataset shards for
`--data.predict_shards`), and scores a predictions JSONL (`predict`'s, or LLaVA's
`{question_id, text}`) by reading each reply with the answer reader of its kind
(`src/eval/answers.py`) and feeding a torchmetrics `Metric` whose states are concatenated
across processes. The report is a Markdown table and JSON, plus one line per question.

A question without a prediction is read as no answer and scored wrong (listed as *missing*);
a reply the reader cannot read is scored wrong (listed as a *failure*): a broken generation
run cannot pass for a weak model.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torchmetrics import Metric

from src.data.conversation import IMAGE_TAG
from src.eval.answers import read_answers
from src.registry import Registry

ANSWER_KINDS = ("letter", "yes_no", "short", "judged")  # judged: rated by a judge LLM (LLaVA-Bench)
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
MAX_ID_LENGTH = 64  # the shard writer's key limit: an id that fits is written unchanged


def sample_id(*parts: object) -> str:
    """A question id the shard writer keeps as it is (letters, digits, `_`, `-`; no dot), so
    `predict`'s ids are the ids `score` looks up. Too long an id is an error, not a silent cut."""
    text = _KEY_UNSAFE.sub("_", "-".join(str(part) for part in parts))
    if len(text) > MAX_ID_LENGTH:
        raise ValueError(f"question id {text!r} is longer than {MAX_ID_LENGTH} characters")
    return text


@dataclass
class Question:
    """One question of a release, as the kit asks and scores it."""

    id: str  # the sample key; predictions are matched by it
    prompt: str  # the human turn, without the image tag
    image: str | None  # relative to the benchmark's image folder
    reference: str  # the reference reply (the record's gpt turn)
    truth: Any  # what the reader's output is compared with
    group: str  # the split / subtask / category the report breaks down by
    info: dict[str, Any] = field(default_factory=dict)  # anything else the metric needs


@dataclass
class Release:
    """The questions of one split and the folder their image paths are relative to."""

    questions: list[Question]
    image_root: Path
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count, from the converter


class Benchmark:
    """A benchmark's contract. Subclasses set the class attributes and implement `load`,
    `read`, `metric`, `update` and `rows`; `convert` and `score` are shared."""

    name: str = ""
    title: str = ""
    answer_kind: str = ""
    release: str = ""  # where the official files come from (shown in --help)
    default_split: str = ""

    # ---- the release ------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, command: str) -> None:
        """The release's options (`command`: convert or score)."""
        parser.add_argument("--root", type=Path, required=True, help=cls.release)
        parser.add_argument("--split", default=cls.default_split, help=f"default {cls.default_split!r}")

    def load(self, args: argparse.Namespace) -> Release:
        raise NotImplementedError

    # ---- reading and scoring ----------------------------------------------------------
    def read(self, reply: str | None, question: Question) -> Any:
        """The reader's output for a reply (None: no prediction)."""
        raise NotImplementedError

    def correct(self, reading: Any, question: Question) -> float:
        """The question's score from the reading (1/0, or a VQA accuracy)."""
        return float(reading is not None and reading == question.truth)

    def failed(self, reading: Any) -> bool:
        return reading is None

    def unit(self, question: Question) -> str:
        """The questions scored together (MME's image pair, MMBench's rotations): a subset of a
        release (evaluation during training's `limit`) takes or leaves a unit whole."""
        return question.id

    def metric(self, questions: list[Question]) -> Metric:
        raise NotImplementedError

    def update(self, metric: Metric, questions: list[Question], readings: list[Any]) -> None:
        raise NotImplementedError

    def rows(self, computed: dict[str, torch.Tensor]) -> tuple[list[str], list[tuple[str, dict]]]:
        """(columns, [(row name, {column: value or None})]) of the report's table."""
        raise NotImplementedError

    def notes(self) -> list[str]:
        return []

    # ---- shared commands ----------------------------------------------------------------
    def records(self, release: Release) -> list[dict]:
        return [to_record(self.name, question) for question in release.questions]

    def write_images(self, release: Release, out: Path) -> None:
        """Puts the images where `release.image_root` says (only for releases that embed them)."""

    def convert(self, args: argparse.Namespace) -> str:
        """Writes `<name>_<split>.json` (+ shards unless --json-only) to `args.out`; returns a summary line."""
        release = self.load(args)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        self.write_images(release, out)
        return write_converted(self.name, args, self.records(release), release.image_root, release.skipped)

    def evaluate(self, questions: list[Question], answers: dict[str, dict]) -> dict:
        """Reads every reply, runs the metric, and lists failures, missing and extra ids."""
        readings, failures, missing = [], [], []
        for question in questions:
            answer = answers.get(question.id)
            reply = None if answer is None else answer["text"]
            reading = self.read(reply, question)
            readings.append(reading)
            if answer is None:
                missing.append(question.id)
            elif self.failed(reading):
                failures.append({"id": question.id, "answer": reply})
        metric = self.metric(questions)
        if questions:
            self.update(metric, questions, readings)
        computed = metric.compute()
        wanted = {question.id for question in questions}
        return {
            "computed": computed,
            "readings": readings,
            "failures": failures,
            "missing": missing,
            "extra": sorted(key for key in answers if key not in wanted),
        }

    def score(self, args: argparse.Namespace) -> str:
        """Writes report.md, report.json and per_question.jsonl to `args.out`; returns the Markdown."""
        release = self.load(args)
        answers, bad = read_answers(args.predictions)
        method = args.method
        if method is None:
            models = {a["model"] for a in answers.values() if a.get("model")}
            method = models.pop() if len(models) == 1 else Path(args.predictions).stem
        result = self.evaluate(release.questions, answers)
        columns, rows = self.rows(result["computed"])
        notes = [
            f"{len(release.questions)} questions of {self.title} split {args.split!r}",
            *self.notes(),
            f"failures (reply not read, counted wrong): {len(result['failures'])}",
            f"missing predictions (counted wrong): {len(result['missing'])}"
            + (f", e.g. {', '.join(result['missing'][:5])}" if result["missing"] else ""),
        ]
        if result["extra"]:
            notes.append(f"predictions for ids outside the split (ignored): {len(result['extra'])}")
        if bad["bad_line"]:
            notes.append(f"prediction lines not read: {bad['bad_line']} (lines {bad['bad_lines'][:10]})")
        text = markdown_table(method, columns, rows, notes)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(text)
        report = {
            "benchmark": self.name,
            "split": args.split,
            "method": method,
            "columns": columns,
            "rows": {name: values for name, values in rows},
            "failures": result["failures"],
            "missing": result["missing"],
            "extra": result["extra"],
            "unread_lines": bad["bad_lines"],
        }
        (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        with open(out / "per_question.jsonl", "w", encoding="utf-8") as stream:
            for question, reading in zip(release.questions, result["readings"], strict=True):
                row = {
                    "id": question.id,
                    "group": question.group,
                    "truth": question.truth,
                    "answer": answers.get(question.id, {}).get("text"),
                    "read": reading,
                    "score": self.correct(reading, question),
                }
                stream.write(json.dumps(row, ensure_ascii=False) + "\n")
        return text


def write_converted(
    name: str, args: argparse.Namespace, records: list[dict], image_root: Path, skipped: dict[str, int] | None = None
) -> str:
    """`convert`'s output, shared by benchmarks with their own records (LLaVA-Bench): `<name>_<split>.json`
    in `args.out`, and WebDataset shards of the records' images under `image_root` unless `--json-only`;
    returns the summary line."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{name}_{args.split}.json"
    json_path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    line = f"{len(records)} questions -> {json_path} (images relative to {image_root})"
    if skipped:
        line += f"; skipped {sum(skipped.values())}: {skipped}"
    if getattr(args, "json_only", False):
        return line
    from src.data.shards import write_shards

    prefix = args.prefix or f"{name}_{args.split}"
    summary = write_shards(records, image_root, out, prefix=prefix, max_count=args.max_count)
    dropped = summary["skipped"]
    return (
        line
        + f"; {summary['samples']} samples in {summary['shards']} shards {out}/{prefix}-*.tar"
        + (f"; the shard writer skipped {sum(dropped.values())}: {dict(dropped)}" if dropped else "")
    )


def to_record(benchmark: str, question: Question) -> dict:
    """A LLaVA record: the image tag first (where LLaVA's inference puts it), the reference reply,
    and the question's scoring fields under the benchmark's name (ignored by training)."""
    text = question.prompt if question.image is None else f"{IMAGE_TAG}\n{question.prompt}"
    record: dict = {"id": question.id}
    if question.image is not None:
        record["image"] = question.image
    record["conversations"] = [{"from": "human", "value": text}, {"from": "gpt", "value": question.reference}]
    record[benchmark] = {"group": question.group, "truth": question.truth, **question.info}
    return record


def percent(value: torch.Tensor | float | None) -> float | None:
    """A 0-1 score as the tables print it: percent, 2 decimals (None: empty)."""
    if value is None:
        return None
    value = float(value)
    return None if value != value else round(100 * value, 2)


def markdown_table(method: str, columns: list[str], rows: list[tuple[str, dict]], notes: list[str]) -> str:
    lines = ["| " + " | ".join(["Method", *columns]) + " |", "|---|" + "|".join("---:" for _ in columns) + "|"]
    for name, values in rows:
        cells = ["-" if values.get(c) is None else f"{values[c]:.2f}" for c in columns]
        label = f"{method} ({name})" if name else method
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + [f"- {note}" for note in notes]) + "\n"


BENCHMARKS: Registry[type[Benchmark]] = Registry("benchmark")


def register_benchmark(cls: type[Benchmark]) -> type[Benchmark]:
    """Registers a Benchmark subclass under its `name`, checking its contract up front."""
    if cls.answer_kind not in ANSWER_KINDS:
        raise ValueError(f"benchmark {cls.name!r}: answer_kind {cls.answer_kind!r} is not one of {list(ANSWER_KINDS)}")
    return BENCHMARKS.register(cls.name)(cls)


def get_benchmark(name: str) -> Benchmark:
    return BENCHMARKS.get(name)()
