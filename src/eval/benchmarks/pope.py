"""POPE (Li et al. 2023, object hallucination): yes/no questions about COCO val2014 images.

Release: the official repository's `output/coco/coco_pope_{adversarial,popular,random}.json`
(as in LLaVA's `playground/data/eval/pope/coco/`): one JSON object a line,
`{"question_id", "image", "text", "label": "yes" | "no"}`; images from COCO val2014.
Prompt: lmms-eval's (`question.strip()` + `\\nAnswer the question using a single word or phrase.`,
also LLaVA-1.5's). Reading: `read_yes_no(mode="exact")`, as lmms-eval's `pope_process_results`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from src.eval.answers import read_yes_no
from src.eval.benchmarks.base import Benchmark, Question, Release, percent, register_benchmark, sample_id
from src.eval.benchmarks.metrics import YesNoMetric

SPLITS = ("adversarial", "popular", "random")
SHORT_ANSWER_PROMPT = "\nAnswer the question using a single word or phrase."
COLUMNS = ("accuracy", "precision", "recall", "f1", "yes_ratio", "truth_yes_ratio")


@register_benchmark
class Pope(Benchmark):
    name = "pope"
    title = "POPE"
    answer_kind = "yes_no"
    release = "folder with coco_pope_{adversarial,popular,random}.json (POPE's output/coco)"
    default_split = "all"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, command: str) -> None:
        parser.add_argument("--root", type=Path, required=True, help=cls.release)
        parser.add_argument("--split", default="all", help=f"one of {list(SPLITS)}, or all (default)")
        parser.add_argument(
            "--images", type=Path, default=None, help="COCO val2014 image folder (default ROOT/val2014)"
        )

    def load(self, args: argparse.Namespace) -> Release:
        root = Path(args.root)
        if args.split != "all" and args.split not in SPLITS:
            raise ValueError(f"unknown POPE split {args.split!r}; choose one of {list(SPLITS)} or all")
        questions = []
        for split in SPLITS if args.split == "all" else (args.split,):
            path = root / f"coco_pope_{split}.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: --root must hold POPE's coco_pope_*.json files")
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                row = json.loads(line)
                label = str(row.get("label", "")).lower().strip()
                if label not in ("yes", "no"):
                    raise ValueError(f"{path} line {number}: label {row.get('label')!r} is not yes or no")
                questions.append(
                    Question(
                        id=sample_id(split, row["question_id"]),
                        prompt=f"{row['text'].strip()}{SHORT_ANSWER_PROMPT}",
                        image=row["image"],
                        reference=label.capitalize(),
                        truth=label,
                        group=split,
                        info={"question_id": row["question_id"]},
                    )
                )
        return Release(questions, Path(args.images) if args.images else root / "val2014")

    def read(self, reply: str | None, question: Question) -> str | None:
        return None if reply is None else read_yes_no(reply, "exact")

    def metric(self, questions: list[Question]) -> YesNoMetric:
        return YesNoMetric([s for s in SPLITS if any(q.group == s for q in questions)])

    def update(self, metric: YesNoMetric, questions: list[Question], readings: list) -> None:
        code = {"yes": 1, "no": 0, None: -1}
        metric.update([code[r] for r in readings], [code[q.truth] for q in questions], [q.group for q in questions])

    def rows(self, computed: dict[str, torch.Tensor]) -> tuple[list[str], list[tuple[str, dict]]]:
        names = [key.split("/")[0] for key in computed if key.endswith("/accuracy")]
        return list(COLUMNS), [(name, {c: percent(computed[f"{name}/{c}"]) for c in COLUMNS}) for name in names]

    def notes(self) -> list[str]:
        return [
            "a reply is yes or no only when it is exactly that (stripped, any case), as lmms-eval reads POPE",
            "yes_ratio: share of replies read as yes (POPE's); truth_yes_ratio: share of questions answered yes "
            "(lmms-eval's pope_yes_ratio)",
        ]
