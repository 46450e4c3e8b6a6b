"""The option a free-text multiple-choice reply names: one reader, two named modes.

Every place that turns a reply into an option uses `read_choice` here: validation during
`fit` (`mc_format: reasoned`), `python -m src.eval.scienceqa score` and its judge ensemble. So
the same reply can never be read two ways by two parts of the kit.

`official` (the default) is LLaVA's `llava/eval/eval_science_qa.py` rule, exactly, on the text
as given (LLaVA's `model_vqa_science.py` strips the generation before writing it; the kit's
`predict` and validation strip it too, and the reader itself does not):
1. the reply is exactly one of the option letters (`"B"`; `" B"` or `"B\\n"` is not);
2. else, the reply's first character is an option letter and the next two are `". "`
   (`"B. basalt"`; `"B."` alone, `"B.\\n..."` and `"B\\n..."` are not);
3. else, `re.findall(r"The answer is ([A-Z]).", reply)` finds exactly one match: that letter.
   The `.` is any character but a newline, so `"The answer is C"` at the very end of a reply,
   or followed by a newline, does not match; two matches (even of one letter) are a failure;
   the letter may be any of A-Z (`"The answer is F."` is read as F, then is out of range).
   The regex does not stop at a word: `"The answer is Cat."` reads C.
Anything else is a failure (`FAILED`). Then LLaVA's `get_pred_idx`: a letter among the first
`len(choices)` option letters is that option; any other letter, or a failure, is no option
(-1 in LLaVA, None here), scored wrong. No stripping, no newline handling, no case folding.
The option letters are the scorer's `--options` default `A`-`E`; for a question with more
than five options (the kit's own multiple-choice data allows eight) they run on to `F`, `G`,
... as `--options ABCDEFGH` would make them. ScienceQA never has more than five, so on it the
rule is the scorer's default, unchanged.

`lenient` reads everything `official` reads, the same way, and where `official` fails it also
accepts, on the reply with its surrounding whitespace stripped:
- a bare option letter (`" C \\n"`);
- an option letter followed by a full stop at the end or before whitespace (`"B."`, `"B.\\nso"`),
  or by a newline (`"B\\nbecause ..."`);
- exactly one `The answer is X`, the letter maybe after a `(`, with anything or nothing after
  it (`"... The answer is C"` at the end, `"The answer is (B)"`).
It never reads a reply that names two answers with "The answer is" (in its looser pattern, or
twice by the official pattern). It is the kit's earlier, more forgiving reading, kept to show
how many replies the official rule fails only on form; a report labels it, never the
paper-style table's main row.

Which reports use which: `scienceqa score`'s table, its judge ensemble row, and validation
during `fit` (`val/mc_accuracy*` with `mc_format: reasoned`) read `official`, so a validation
number is the number the paper's scorer would give the same replies; `scienceqa score
--lenient` adds a row labelled "(lenient reading)".
"""

from __future__ import annotations

import json
import logging
import re
import string
from collections.abc import Callable, Sequence
from pathlib import Path

from src.registry import Registry

log = logging.getLogger(__name__)

SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")  # eval_science_qa.py's `--options` default

_OFFICIAL_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")  # eval_science_qa.py's pattern, as it is
_LENIENT_ANSWER_IS = re.compile(r"The answer is \(?([A-Z])")
_LENIENT_LEADING = re.compile(r"([A-Z])(?:\.(?:\s|$)|[^\S\n]*\n)")  # "B." "B. x" "B.\nx" "B\nx"

Reader = Callable[[str, tuple[str, ...]], str | None]
READERS: Registry[Reader] = Registry("answer reading mode")


@READERS.register("official")
def read_official(reply: str, options: tuple[str, ...]) -> str | None:
    """The letter `eval_science_qa.py` parses from `reply` (its `parsed_ans`), or None for its
    `FAILED`. The letter may lie outside the question's options: `read_choice` decides that."""
    if reply in options:
        return reply
    if len(reply) >= 3 and reply[0] in options and reply[1:3] == ". ":
        return reply[0]
    found = _OFFICIAL_ANSWER_IS.findall(reply)
    return found[0] if len(found) == 1 else None


@READERS.register("lenient")
def read_lenient(reply: str, options: tuple[str, ...]) -> str | None:
    """`official`'s letter where it reads one; else the forms listed in the module docstring."""
    letter = read_official(reply, options)
    if letter is not None:
        return letter
    text = reply.strip()
    answers = _LENIENT_ANSWER_IS.findall(text)
    if len(answers) > 1 or len(_OFFICIAL_ANSWER_IS.findall(reply)) > 1:
        return None  # two answers: a hedge is never read
    if text in options:
        return text
    if (match := _LENIENT_LEADING.match(text)) and match.group(1) in options:
        return match.group(1)
    return answers[0] if answers else None


def option_letters(num_options: int) -> tuple[str, ...]:
    """The letters a reply may name: the scorer's A-E, run on for a question with more options."""
    if not 1 <= num_options <= len(string.ascii_uppercase):
        raise ValueError(f"a question has 1 to 26 options, got {num_options}")
    return tuple(string.ascii_uppercase[: max(len(SCIENCEQA_OPTIONS), num_options)])


def read_letter(reply: str, mode: str = "official", options: Sequence[str] = SCIENCEQA_OPTIONS) -> str | None:
    """The letter `mode` reads from `reply` (None: a failure), before any check against the
    question's number of options; `options` are the scorer's `--options`."""
    return READERS.get(mode)(reply, tuple(options))


def read_choice(reply: str, num_options: int, mode: str = "official") -> int | None:
    """The 0-based option `reply` names for a question with `num_options` options, or None
    (a failure, or a letter beyond the options: scored wrong), as LLaVA's `get_pred_idx` maps it."""
    options = option_letters(num_options)
    letter = read_letter(reply, mode, options)
    if letter is not None and letter in options[:num_options]:
        return options.index(letter)
    return None


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
