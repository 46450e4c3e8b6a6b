"""MMBench (Liu et al. 2023), single-choice questions scored by circular evaluation.

Release: the official TSV (`MMBench_DEV_EN.tsv`, ...): columns `index, question, hint, A, B, C,
D, answer, category, image` (base64; a short number instead names the row whose image it
shares), `l2-category`, ... Rows with `index >= 10**6` are rotations of question
`index % 10**6` with the options shifted and the answer moved with them; when the file has
none, the converter makes them (one per option but the first, index + k * 10**6), so every
question is asked with each option in each place. A question counts only when every rotation
is answered right (MMBench's circular evaluation, lmms-eval's `eval_result`).
Prompt: lmms-eval's `mmbench_doc_to_text` (hint, question, `There are several options:` and
`A. ...` lines, then `\\n\\nAnswer with the option's letter from the given choices directly.`).
Reading: `read_choice_mmbench`, the evaluator's reading without a judge LLM (lmms-eval's
`mmbench_en_dev_static`).
"""

from __future__ import annotations

import argparse
import base64
import csv
import sys
from pathlib import Path

import torch

from src.eval.answers import read_choice_mmbench
from src.eval.benchmarks.base import Benchmark, Question, Release, percent, register_benchmark, sample_id
from src.eval.benchmarks.metrics import CircularMetric

LETTERS = "ABCD"
ROTATION = 10**6
OPTIONS_HEADER = "There are several options:"
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."


def _missing(value: str | None) -> bool:
    return value is None or value == "" or value == "nan"


def prompt_text(question: str, hint: str | None, options: dict[str, str]) -> str:
    """lmms-eval's MMBench prompt for one row."""
    listed = "\n".join(f"{letter}. {text}" for letter, text in sorted(options.items()))
    body = f"{OPTIONS_HEADER}\n{listed}"
    query = f"{question} {body}" if _missing(hint) else f"{hint} {question} {body}"
    return f"{query}\n{POST_PROMPT}"


def read_tsv(path: Path) -> list[dict[str, str]]:
    csv.field_size_limit(sys.maxsize)  # base64 images are longer than csv's default field limit
    with open(path, encoding="utf-8", newline="") as stream:
        rows = list(csv.DictReader(stream, delimiter="\t"))
    if rows and not {"index", "question", "answer", "A", "B"} <= set(rows[0]):
        raise ValueError(f"{path}: not an MMBench TSV (needs index, question, answer, A, B columns)")
    return rows


def rotations(row: dict[str, str]) -> list[dict[str, str]]:
    """The row's option rotations k = 1 .. n-1 (option k becomes A), the answer moved along."""
    options = [row[letter] for letter in LETTERS if not _missing(row.get(letter))]
    answer = LETTERS.index(row["answer"])
    made = []
    for k in range(1, len(options)):
        rotated = dict(row)
        shifted = options[k:] + options[:k]
        for i, letter in enumerate(LETTERS):
            rotated[letter] = shifted[i] if i < len(shifted) else ""
        rotated["answer"] = LETTERS[(answer - k) % len(options)]
        rotated["index"] = str(int(row["index"]) + k * ROTATION)
        made.append(rotated)
    return made


@register_benchmark
class MMBench(Benchmark):
    name = "mmbench"
    title = "MMBench"
    answer_kind = "letter"
    release = "the official TSV file (MMBench_DEV_EN.tsv ...)"
    default_split = "dev"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, command: str) -> None:
        parser.add_argument("--root", type=Path, required=True, help=cls.release)
        parser.add_argument("--split", default="dev", help="a name for the output files (default dev)")

    def load(self, args: argparse.Namespace) -> Release:
        path = Path(args.root)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: --root must be an MMBench TSV file")
        rows = read_tsv(path)
        images = {row["index"]: row.get("image", "") for row in rows}
        if not any(int(row["index"]) >= ROTATION for row in rows):
            rows = [r for row in rows for r in [row, *rotations(row)]]
        rows.sort(key=lambda row: (int(row["index"]) % ROTATION, int(row["index"])))
        questions = []
        for row in rows:
            index = int(row["index"])
            options = {letter: row[letter] for letter in LETTERS if not _missing(row.get(letter))}
            if row["answer"] not in options:
                raise ValueError(f"{path}: row {index}'s answer {row['answer']!r} is not one of its options")
            original = str(index % ROTATION)
            image = row.get("image", "") or images.get(original, "")
            if image and len(image) <= 64 and image.isdigit():  # the image of another row
                image = images.get(image, "")
            hint = None if _missing(row.get("hint")) else row["hint"]
            questions.append(
                Question(
                    id=sample_id(index),
                    prompt=prompt_text(row["question"], hint, options),
                    image=f"{index}.img" if image else None,
                    reference=row["answer"],
                    truth=row["answer"],
                    group=row.get("category") or "uncategorized",
                    info={
                        "index": index,
                        "options": options,
                        "hint": hint,
                        "l2": row.get("l2-category") or "uncategorized",
                        "image_b64": image,
                    },  # fmt: skip
                )
            )
        return Release(questions, Path(args.out) / "images" if getattr(args, "out", None) else path.parent)

    def write_images(self, release: Release, out: Path) -> None:
        release.image_root.mkdir(parents=True, exist_ok=True)
        for question in release.questions:
            if question.image is not None:
                (release.image_root / question.image).write_bytes(base64.b64decode(question.info["image_b64"]))

    def records(self, release: Release) -> list[dict]:
        records = super().records(release)
        for record in records:
            record[self.name].pop("image_b64", None)
        return records

    def read(self, reply: str | None, question: Question) -> str | None:
        return None if reply is None else read_choice_mmbench(reply, question.info["options"])

    def failed(self, reading: str | None) -> bool:
        return reading is None or reading not in LETTERS

    def unit(self, question: Question) -> str:
        return str(question.info["index"] % ROTATION)

    def metric(self, questions: list[Question]) -> CircularMetric:
        groups = sorted({q.group for q in questions})
        return CircularMetric(groups, sorted({q.info["l2"] for q in questions}))

    def update(self, metric: CircularMetric, questions: list[Question], readings: list) -> None:
        metric.update(
            [self.correct(r, q) for r, q in zip(readings, questions, strict=True)],
            [q.info["index"] % ROTATION for q in questions],
            [float(q.info["index"] < ROTATION) for q in questions],
            [q.group for q in questions],
            [q.info["l2"] for q in questions],
        )

    def rows(self, computed: dict[str, torch.Tensor]) -> tuple[list[str], list[tuple[str, dict]]]:
        rows = [("", {"overall": percent(computed["all"])})]
        rows += [(key, {"overall": percent(value)}) for key, value in computed.items()
                 if key.startswith(("category/", "l2/"))]  # fmt: skip
        return ["overall"], rows

    def notes(self) -> list[str]:
        return ["circular evaluation: a question is right only when all its option rotations are",
                "replies read as MMBench's evaluator reads them without a judge (lmms-eval's static)"]  # fmt: skip
