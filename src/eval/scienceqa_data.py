"""ScienceQA's official release, read and turned into LLaVA records with the paper's prompts.

The release layout (lupantech/ScienceQA, and LLaVA's `playground/data/eval/scienceqa`):

    <root>/problems.json      {pid: {question, choices, answer (int), hint, image ("image.png" | null),
                               subject, grade ("grade1".."grade12"), lecture, solution, split, ...}}
    <root>/pid_splits.json    {"train": [pid, ...], "val": [...], "test": [...], "minival": [...], ...}
    <root>/images/<split>/<pid>/image.png   (split: the problem's own, train / val / test)

Prompt texts follow LLaVA's `scripts/convert_sqa_to_llava_base_prompt.py` character for
character (context "N/A" when there is no hint, options as `(A) x (B) y`, double spaces
collapsed once, ends stripped), with two formats:

- `CQM-A` (zero-shot, LLaVA's `model_vqa_science --single-pred-prompt`): the human turn is
  `Context: ...\\nQuestion: ...\\nOptions: (A) ... (B) ...\\nAnswer with the option's letter from
  the given choices directly.`; the reference reply is the bare letter, which is what that
  instruction asks for.
- `QCM-LEA` (the paper's fine-tuning format): the human turn is `Question: ...\\nContext:
  ...\\nOptions: ...` with the leading `Question: ` removed, as the converter does; the reply is
  `{lecture} {solution} The answer is X.`.

Where the image goes: `<image>\\n` before the text. LLaVA's converter writes the tag after
the text, but both its training code (`preprocess_multimodal`) and its ScienceQA inference
move the tag to the front, so the front is what the model sees either way.

Besides `conversations`, each record carries `mc` (one multiple-choice item, so the same
shards serve `data.eval_view: mc` during fit; its `type` lists the columns of the paper's table
it counts in, so validation logs each column) and `scienceqa` (the columns the paper's table groups by), both ignored by training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from src.data.conversation import IMAGE_TAG

FORMATS = ("CQM-A", "QCM-LEA")
OPTIONS = "ABCDE"
SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}


@dataclass
class Release:
    """problems.json and pid_splits.json of one ScienceQA folder."""

    root: Path
    problems: dict[str, dict]
    splits: dict[str, list[str]]

    def split(self, name: str) -> list[str]:
        if name not in self.splits:
            raise ValueError(f"no split {name!r} in {self.root / 'pid_splits.json'}; it has {sorted(self.splits)}")
        missing = [pid for pid in self.splits[name] if pid not in self.problems]
        if missing:
            raise ValueError(f"split {name!r} names {len(missing)} pids not in problems.json, e.g. {missing[:3]}")
        return list(self.splits[name])

    @property
    def image_root(self) -> Path:
        return self.root / "images"


def load_release(root: Path | str) -> Release:
    """Reads the two JSON files; a missing file or a malformed problem is a clear error up front."""
    root = Path(root)
    for name in ("problems.json", "pid_splits.json"):
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root / name} not found: --root must be a ScienceQA release folder")
    problems = json.loads((root / "problems.json").read_text())
    splits = json.loads((root / "pid_splits.json").read_text())
    if not isinstance(problems, dict) or not isinstance(splits, dict):
        raise ValueError(f"{root}: problems.json and pid_splits.json must be JSON objects")
    for pid, problem in problems.items():
        for key in ("question", "choices", "answer"):
            if key not in problem:
                raise ValueError(f"problem {pid} has no {key!r}")
        if not 2 <= len(problem["choices"]) <= len(OPTIONS):
            raise ValueError(f"problem {pid} has {len(problem['choices'])} choices; ScienceQA has 2 to 5")
    return Release(root, problems, {k: [str(p) for p in v] for k, v in splits.items()})


# ---------------------------------------------------------------- the reference prompt texts


def context_text(problem: dict) -> str:
    """The hint, or "N/A" (the reference with use_caption=False)."""
    context = " ".join([problem.get("hint") or "", ""]).strip()
    return context or "N/A"


def choice_text(problem: dict) -> str:
    return " ".join(f"({OPTIONS[i]}) {c}" for i, c in enumerate(problem["choices"]))


def prompt_pair(problem: dict, fmt: str) -> tuple[str, str]:
    """(human text, reply) of one problem, before the image tag and the single-pred prompt."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown ScienceQA format {fmt!r}; choose one of {list(FORMATS)}")
    question, context, choice = problem["question"], context_text(problem), choice_text(problem)
    answer = OPTIONS[int(problem["answer"])]
    if fmt == "CQM-A":
        text = f"Context: {context}\nQuestion: {question}\nOptions: {choice}\n"
        reply = answer
    else:
        text = f"Question: {question}\nContext: {context}\nOptions: {choice}\n"
        lecture, solution = problem.get("lecture") or "", problem.get("solution") or ""
        reply = f"Answer: {lecture} {solution} The answer is {answer}."
    text = text.replace("  ", " ").strip()
    reply = reply.replace("  ", " ").strip()
    text = text.removeprefix("Question: ")
    reply = reply.removeprefix("Answer: ")
    if fmt == "CQM-A":
        text = f"{text}\n{SINGLE_PRED_PROMPT}"
    return text, reply


# ---------------------------------------------------------------- categories of the paper's table

CATEGORIES = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")


def categories(problem: dict) -> list[str]:
    """The table's columns a problem counts in, by ScienceQA's own `get_scores`: the subject;
    TXT if it has a (non-empty) hint, IMG if it has an image, NO if neither (a question with
    both counts in TXT and IMG); G1-6 for grade1..grade6, G7-12 for grade7..grade12."""
    found = []
    subject = SUBJECTS.get(problem.get("subject", ""))
    if subject:
        found.append(subject)
    has_text, has_image = bool(problem.get("hint")), bool(problem.get("image"))
    found += [name for name, yes in (("TXT", has_text), ("IMG", has_image)) if yes]
    if not has_text and not has_image:
        found.append("NO")
    grade = str(problem.get("grade", ""))
    if grade.startswith("grade") and grade[5:].isdigit():
        found.append("G1-6" if int(grade[5:]) <= 6 else "G7-12")
    return found


# ---------------------------------------------------------------- LLaVA records


def to_record(pid: str, problem: dict, fmt: str, split: str = "test") -> dict:
    """One LLaVA record, with `mc` and `scienceqa`. The image path is relative to `<root>/images`:
    `<folder>/<pid>/image.png`, the folder being the problem's own `split` field (`split` when it
    has none), since derived splits (minival, trainval, ...) have no image folder of their own."""
    text, reply = prompt_pair(problem, fmt)
    record: dict = {"id": pid}
    if problem.get("image"):
        record["image"] = f"{problem.get('split') or split}/{pid}/{problem['image']}"
        text = f"{IMAGE_TAG}\n{text}"
    record["conversations"] = [{"from": "human", "value": text}, {"from": "gpt", "value": reply}]
    mc_question = f"Context: {context_text(problem)}\nQuestion: {problem['question']}"
    record["mc"] = [
        {
            "question": mc_question,
            "options": list(problem["choices"]),
            "answer": int(problem["answer"]),
            "type": categories(problem) or ["other"],  # validation logs each column of the paper's table
        }
    ]
    record["scienceqa"] = {
        "format": fmt,
        "subject": problem.get("subject"),
        "grade": problem.get("grade"),
        "categories": categories(problem),
    }
    return record


def convert(
    root: Path | str, split: str, fmt: str, out: Path | str, prefix: str | None = None, max_count: int = 10000
) -> dict:
    """Writes `{prefix}-NNNNNN.tar` shards (sample key = pid) and `llava_{split}_{fmt}.json` (image
    paths relative to `<root>/images`) to `out`; returns the shard writer's summary with the JSON's
    path added. A problem whose image is missing or broken is skipped and counted by the writer."""
    from src.data.shards import write_shards

    release = load_release(root)
    pids = release.split(split)
    records = [to_record(pid, release.problems[pid], fmt, split) for pid in pids]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"llava_{split}_{fmt}.json"
    json_path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    prefix = prefix or f"scienceqa_{split}_{fmt}"
    summary = write_shards(records, release.image_root, out, prefix=prefix, max_count=max_count)
    summary["json"] = str(json_path)
    summary["prefix"] = prefix
    return summary
