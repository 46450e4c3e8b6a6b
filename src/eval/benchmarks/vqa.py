"""GQA and TextVQA: short answers, compared after the standard normalisation.

GQA release: `<split>_balanced_questions.json` (`{qid: {imageId, question, answer, types:
{structural, ...}}}`, split default `testdev`) and `images/<imageId>.jpg`. Scored as lmms-eval
scores its `gqa` task: exact match after lower-casing and removing ASCII punctuation
(`normalize_short_answer(mode="exact_match")`), overall and by structural type.

TextVQA release: `TextVQA_0.5.1_<split>.json` (`{"data": [{question_id, question, image_id,
answers: [10 strings]}]}`, split default `val`) and `train_images/<image_id>.jpg` (the val
images are in the train folder). Scored as lmms-eval's `textvqa_process_results` and the
official VQA evaluation: the reply and the ten answers normalised (`mode="vqa"`), then the mean,
over the ten ways of leaving one answer out, of min(#matches among the other nine / 3, 1).
Prompts: lmms-eval's (`question` + `\\nAnswer the question using a single word or phrase.`;
TextVQA's question `.capitalize()`d, as lmms-eval does, without OCR tokens).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from src.eval.answers import normalize_short_answer, read_short_answer
from src.eval.benchmarks.base import Benchmark, Question, Release, percent, register_benchmark, sample_id
from src.eval.benchmarks.metrics import MeanScoreMetric

SHORT_ANSWER_PROMPT = "\nAnswer the question using a single word or phrase."


def vqa_accuracy(reading: str, answers: list[str]) -> float:
    """The official VQA accuracy of a normalised reply against the normalised answers."""
    if not answers:
        return 0.0
    scores = [
        min(1.0, sum(other == reading for other in answers[:i] + answers[i + 1 :]) / 3) for i in range(len(answers))
    ]
    return sum(scores) / len(scores)


class ShortAnswer(Benchmark):
    answer_kind = "short"
    mode = "vqa"

    def read(self, reply: str | None, question: Question) -> str | None:
        return None if reply is None else read_short_answer(reply, self.mode)

    def metric(self, questions: list[Question]) -> MeanScoreMetric:
        return MeanScoreMetric(sorted({q.group for q in questions}))  # "": no group (in `all` only)

    def update(self, metric: MeanScoreMetric, questions: list[Question], readings: list) -> None:
        metric.update(
            [self.correct(r, q) for r, q in zip(readings, questions, strict=True)], [q.group for q in questions]
        )

    def rows(self, computed: dict[str, torch.Tensor]) -> tuple[list[str], list[tuple[str, dict]]]:
        groups = [key for key in computed if key and not key.startswith("count/")]
        return ["accuracy"], [("" if name == "all" else name, {"accuracy": percent(computed[name])}) for name in groups]

    def _json(self, path: Path) -> dict | list:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: --root must be the {self.title} release folder")
        return json.loads(path.read_text())


@register_benchmark
class GQA(ShortAnswer):
    name = "gqa"
    title = "GQA"
    release = "folder with <split>_balanced_questions.json and images/"
    default_split = "testdev"
    mode = "exact_match"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, command: str) -> None:
        super().add_arguments(parser, command)
        parser.add_argument("--images", type=Path, default=None, help="image folder (default ROOT/images)")

    def load(self, args: argparse.Namespace) -> Release:
        root = Path(args.root)
        questions = self._json(root / f"{args.split}_balanced_questions.json")
        made = []
        for qid, item in questions.items():
            made.append(
                Question(
                    id=sample_id(qid),
                    prompt=f"{item['question']}{SHORT_ANSWER_PROMPT}",
                    image=f"{item['imageId']}.jpg",
                    reference=item["answer"],
                    truth=normalize_short_answer(item["answer"], self.mode),
                    group=(item.get("types") or {}).get("structural") or "",
                    info={"answer": item["answer"]},
                )
            )
        return Release(made, Path(args.images) if args.images else root / "images")

    def notes(self) -> list[str]:
        return ["exact match after lower-casing and removing punctuation (lmms-eval's gqa); rows by structural type"]


@register_benchmark
class TextVQA(ShortAnswer):
    name = "textvqa"
    title = "TextVQA"
    release = "folder with TextVQA_0.5.1_<split>.json and train_images/"
    default_split = "val"
    mode = "vqa"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, command: str) -> None:
        super().add_arguments(parser, command)
        parser.add_argument("--images", type=Path, default=None, help="image folder (default ROOT/train_images)")

    def load(self, args: argparse.Namespace) -> Release:
        root = Path(args.root)
        data = self._json(root / f"TextVQA_0.5.1_{args.split}.json")
        made = []
        for item in data["data"] if isinstance(data, dict) else data:
            answers = list(item.get("answers") or [])
            made.append(
                Question(
                    id=sample_id(item["question_id"]),
                    prompt=f"{item['question'].capitalize()}{SHORT_ANSWER_PROMPT}",
                    image=f"{item['image_id']}.jpg",
                    reference=Counter(answers).most_common(1)[0][0] if answers else "",
                    truth=[normalize_short_answer(a, self.mode) for a in answers],
                    group="",
                    info={"question_id": item["question_id"]},
                )
            )
        return Release(made, Path(args.images) if args.images else root / "train_images")

    def correct(self, reading: str | None, question: Question) -> float:
        return 0.0 if reading is None else vqa_accuracy(reading, question.truth)

    def notes(self) -> list[str]:
        return ["VQA accuracy: mean over the 10 leave-one-out subsets of min(#matches / 3, 1), answers normalised"]
