"""The option a free-text multiple-choice reply names, read as LLaVA's ScienceQA scoring reads it.

`llava/eval/eval_science_qa.py` accepts, in this order:
1. the whole reply is one option letter (`"B"`, surrounding whitespace ignored);
2. the reply starts with a letter, a full stop and a space (`"B. Paris"`);
3. the reply says `The answer is X` (with or without the full stop).
Anything else is `FAILED` and scores as wrong. Before the checks LLaVA strips the generated
text (`model_vqa_science.py`) and its scorer turns each newline into `". "`, so
`"B\\nbecause ..."` counts as rule 2; we do the same.

Where we are stricter than the reference, on purpose and as the issue asks: rule 3 needs
*exactly one* `The answer is X` in the reply (the reference takes the first of several, so a
reply that hedges over two letters would score when its first guess is right; LLaVA's own
GPT-4 ensemble script already insists on exactly one). A letter beyond the question's
options (`"E"` for a 4-option question) is a failure, as in the reference.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

LETTERS = "ABCDE"  # ScienceQA has at most 5 options; the reference scripts read A-E only
_LEADING = re.compile(r"^([A-E])\. ")
_ANSWER_IS = re.compile(r"The answer is ([A-E])")


def extract_letter(reply: str) -> str | None:
    """The option letter a reply names, or None when it names none by the rules above."""
    text = reply.strip().replace("\n", ". ")  # LLaVA strips the generation, then its scorer swaps newlines
    if text in LETTERS and len(text) == 1:
        return text
    if match := _LEADING.match(text):
        return match.group(1)
    found = _ANSWER_IS.findall(text)
    if len(found) == 1:
        return found[0]
    return None


def extract_choice(reply: str, num_options: int) -> int | None:
    """The 0-based option a reply names, or None (a failure: scored wrong)."""
    letter = extract_letter(reply)
    if letter is None:
        return None
    index = LETTERS.index(letter)
    return index if index < num_options else None


# ---------------------------------------------------------------- answer files


def read_answers(path: Path | str) -> tuple[dict[str, dict], dict]:
    """Answers by id from a JSONL file, in either layout:

    - ours (`python -m src.cli predict`): `{"id", "answer", "prompt", "reference", "model", ...}`;
    - LLaVA's (`model_vqa*.py`, LLaVA-Bench's `answers_*.jsonl`): `{"question_id", "text", ...}`.

    Returns `{id: {"text": str, "model": str | None}}` and counts of what was not used: lines
    that do not parse or lack an id or a text (`bad_line`, with their line numbers in
    `bad_lines`). An id given twice is an error: which of the two to score would be a guess.
    """
    answers: dict[str, dict] = {}
    where: dict[str, int] = {}
    problems: dict = {"bad_line": 0, "bad_lines": []}
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            key = text = None
            if isinstance(record, dict):
                key = record.get("id", record.get("question_id"))
                text = record.get("answer", record.get("text"))
            if key is None or not isinstance(text, str):
                problems["bad_line"] += 1
                problems["bad_lines"].append(number)
                log.warning("%s line %d: not an answer record (needs id/question_id and answer/text)", path, number)
                continue
            key = str(key)
            if key in answers:
                raise ValueError(f"{path}: id {key!r} is answered twice (lines {where[key]} and {number})")
            answers[key] = {"text": text, "model": record.get("model", record.get("model_id"))}
            where[key] = number
    return answers, problems
