"""MME (Fu et al. 2023): two yes/no questions per image, 10 perception and 4 cognition subtasks.

Release: `MME_Benchmark_release_version/<subtask>/`, in either of the official layouts:
`images/*.jpg|png` + `questions_answers_YN/*.txt` (artwork, celebrity, landmark, posters,
scene), or the images and `.txt` files side by side (the others). Each `.txt` holds the image's
two questions, `question<TAB>Yes|No` a line. Prompt: lmms-eval's (the question without
` Please answer yes or no.`, + `\\nAnswer the question using a single word or phrase.`).
Reading: `read_yes_no(mode="prefix")`, MME's `calculation.py` rule as lmms-eval has it.
Score per subtask: acc (percent of questions) + acc+ (percent of images with both right);
Perception and Cognition are sums of their subtasks' scores (at most 2000 and 800).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from src.eval.answers import read_yes_no
from src.eval.benchmarks.base import Benchmark, Question, Release, register_benchmark, sample_id
from src.eval.benchmarks.metrics import PairMetric

SECTIONS = {
    "Perception": ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                   "artwork", "OCR"],
    "Cognition": ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"],
}  # fmt: skip
SUBTASKS = [name for members in SECTIONS.values() for name in members]
OLD_PROMPT = " Please answer yes or no."
SHORT_ANSWER_PROMPT = "\nAnswer the question using a single word or phrase."
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


def _questions_of(folder: Path) -> tuple[Path, Path]:
    """(question folder, image folder) of one subtask, in either official layout."""
    if (folder / "questions_answers_YN").is_dir():
        return folder / "questions_answers_YN", folder / "images"
    return folder, folder


@register_benchmark
class MME(Benchmark):
    name = "mme"
    title = "MME"
    answer_kind = "yes_no"
    release = "MME_Benchmark_release_version folder (one folder per subtask)"
    default_split = "test"

    def load(self, args: argparse.Namespace) -> Release:
        root = Path(args.root)
        present = [name for name in SUBTASKS if (root / name).is_dir()]
        if not present:
            raise FileNotFoundError(f"{root} has none of MME's subtask folders {SUBTASKS}")
        questions, skipped = [], {}
        for subtask in present:
            text_folder, image_folder = _questions_of(root / subtask)
            for pair, text_file in enumerate(sorted(text_folder.glob("*.txt"))):
                image = next((image_folder / (text_file.stem + s) for s in IMAGE_SUFFIXES
                              if (image_folder / (text_file.stem + s)).is_file()), None)  # fmt: skip
                if image is None:
                    skipped["no_image"] = skipped.get("no_image", 0) + 1
                    continue
                lines = [line for line in text_file.read_text(encoding="utf-8").splitlines() if line.strip()]
                if len(lines) != 2 or any("\t" not in line for line in lines):
                    raise ValueError(f"{text_file}: MME has two 'question<TAB>answer' lines per image")
                for number, line in enumerate(lines):
                    question, answer = line.rsplit("\t", 1)
                    truth = answer.lower().strip().replace(".", "")
                    if truth not in ("yes", "no"):
                        raise ValueError(f"{text_file}: answer {answer!r} is not Yes or No")
                    questions.append(
                        Question(
                            id=sample_id(subtask, text_file.stem, number),
                            prompt=question.strip().replace(OLD_PROMPT, "") + SHORT_ANSWER_PROMPT,
                            image=str(image.relative_to(root)),
                            reference=truth.capitalize(),
                            truth=truth,
                            group=subtask,
                            info={"pair": pair, "image_name": image.name},
                        )
                    )
        return Release(questions, root, skipped)

    def read(self, reply: str | None, question: Question) -> str | None:
        return None if reply is None else read_yes_no(reply, "prefix")

    def unit(self, question: Question) -> str:
        return f"{question.group}/{question.info['pair']}"

    def metric(self, questions: list[Question]) -> PairMetric:
        return PairMetric([s for s in SUBTASKS if any(q.group == s for q in questions)], SECTIONS)

    def update(self, metric: PairMetric, questions: list[Question], readings: list) -> None:
        correct = [self.correct(r, q) for r, q in zip(readings, questions, strict=True)]
        metric.update(correct, [q.info["pair"] for q in questions], [q.group for q in questions])

    def rows(self, computed: dict[str, torch.Tensor]) -> tuple[list[str], list[tuple[str, dict]]]:
        columns = ["acc", "acc_plus", "score"]
        rows = []
        for name in SUBTASKS:
            if f"{name}/score" in computed:
                rows.append((name, {c: round(float(computed[f"{name}/{c}"]), 2) for c in columns}))
        for section in SECTIONS:
            value = float(computed[f"{section}/score"])
            rows.append((section, {"score": None if value != value else round(value, 2)}))
        return columns, rows

    def notes(self) -> list[str]:
        return ["acc and acc_plus in percent; score = acc + acc_plus; Perception / Cognition: sums of scores",
                "replies read by MME's rule (yes/no, y/n, or yes/no in the first four characters)"]  # fmt: skip
