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


# ---------------------------------------------------------------- other answer kinds (src/eval/benchmarks)
# The benchmarks of `python -m src.eval` read replies through these and `read_choice` only, in
# validation and offline scoring alike. Each mode is a published scorer's rule, named after it;
# `tests/eval/test_benchmark_*.py` check each against lmms-eval's code on the same replies.

YES_NO_MODES = ("exact", "prefix")


def read_yes_no(reply: str, mode: str = "exact") -> str | None:
    """ "yes", "no", or None (neither: scored wrong) read from `reply`.

    `exact` (POPE, as lmms-eval's `pope_process_results`): the stripped, lower-cased reply is
    exactly `yes` or `no` (`"Yes."` is neither). `prefix` (MME, its official `calculation.py`
    via Otter's `parse_pred_ans`, as lmms-eval): full stops removed, then `yes` / `no`, a lone
    `y` / `n`, or else `yes` (then `no`) anywhere in the first four characters."""
    if mode not in YES_NO_MODES:
        raise ValueError(f"unknown yes/no reading mode {mode!r}; choose one of {list(YES_NO_MODES)}")
    text = reply.strip().lower().strip()
    if mode == "exact":
        return text if text in ("yes", "no") else None
    text = text.replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text)
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else None


SHORT_ANSWER_MODES = ("vqa", "exact_match")


def normalize_short_answer(text: str, mode: str = "vqa") -> str:
    """A short answer (a reply or a reference) in the form a scorer compares: `vqa`, the
    official VQA evaluation's normalisation (src/eval/vqa_normalize.py; TextVQA, VQAv2);
    `exact_match`, lmms-eval's `exact_match` with `ignore_case` and `ignore_punctuation` (GQA):
    lower-cased, ASCII punctuation removed, nothing else (spaces and articles stay)."""
    if mode == "vqa":
        from src.eval.vqa_normalize import normalize_vqa_answer

        return normalize_vqa_answer(text)
    if mode == "exact_match":
        return text.lower().translate(str.maketrans("", "", string.punctuation))
    raise ValueError(f"unknown short-answer mode {mode!r}; choose one of {list(SHORT_ANSWER_MODES)}")


def read_short_answer(reply: str, mode: str = "vqa") -> str:
    """The reply as its scorer compares it: stripped (as lmms-eval strips every generation), then
    `normalize_short_answer`."""
    return normalize_short_answer(reply.strip(), mode)


MMBENCH_OPTION_LETTERS = "ABCDE"  # MMBench's `can_infer_option` looks for any of five letters
_MMBENCH_WRAPPINGS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
                      (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."))  # fmt: skip
_MCQ_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select",
    "i pick", "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)  # fmt: skip
_MCQ_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4,
                 "right_paren": 3, "space": 2, "fallback": 0}  # fmt: skip


def _mmbench_letter(reply: str) -> str | None:
    """MMBench's `can_infer_option`: one option letter standing alone among the reply's words (not
    a lone `A` in a reply of more than three words: maybe the article), or wrapped once as `A.`,
    `(A)`, `:A` ..."""
    if "Failed to obtain answer via API" in reply:  # the evaluator's own judge-failure text
        return None
    words = [word.strip() for word in reply.split()]

    def count(prefix: str = "", suffix: str = "") -> int:
        return sum(prefix + letter + suffix in words for letter in MMBENCH_OPTION_LETTERS)

    if count() == 1 and not ("A" in words and len(words) > 3):
        return next(letter for letter in MMBENCH_OPTION_LETTERS if letter in words)
    for prefix, suffix in _MMBENCH_WRAPPINGS:
        if count(prefix, suffix) == 1:
            return next(letter for letter in MMBENCH_OPTION_LETTERS if prefix + letter + suffix in words)
    return None


def _mmbench_text(reply: str, options: dict[str, str]) -> str | None:
    """MMBench's `can_infer_text`: exactly one option's text (lower-cased) occurs in the reply."""
    text = reply.lower()
    found = [letter for letter, option in options.items() if str(option).lower() in text]
    return found[0] if len(found) == 1 else None


def _mcq_extract(reply: str, letters: list[str]) -> str | None:
    """lmms-eval's static fallback (`extract_mcq_answer`): the letter of the strongest, then
    latest, form (`A` first or last, an answer phrase, `(A)`, `A.`, `A:`, `A)`, `A `, any `A`)."""
    if not reply.strip():
        return None
    text = reply.strip()
    for char in ",.!?;:'\"":
        text = text.strip(char)
    text = f" {text} "
    found: list[tuple[str, int, str]] = []
    for form, pattern in (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"), ("right_paren", "{})"),
                          ("space", "{} ")):  # fmt: skip
        found += [(ch, text.rfind(pattern.format(ch)), form) for ch in letters if pattern.format(ch) in text]
    lower = text.lower()
    for phrase in _MCQ_PHRASES:
        at = lower.find(phrase)
        if at != -1:
            after = at + len(phrase)
            found += [(ch, text.find(ch, after), "phrase") for ch in letters if text.find(ch, after) != -1]
    stripped = text.strip()
    for ch in letters:
        if stripped.startswith(ch) and (len(stripped) == 1 or not stripped[1].isalpha()):
            found.append((ch, 0, "start"))
    for ch in letters:
        if stripped.endswith(ch) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            found.append((ch, len(text) - 1, "end"))
    if not found:
        found = [(ch, text.rfind(ch), "fallback") for ch in letters if ch in text]
    if not found:
        return None
    found.sort(key=lambda item: (_MCQ_PRIORITY[item[2]], item[1]), reverse=True)
    return found[0][0]


def read_choice_mmbench(reply: str, options: dict[str, str]) -> str | None:
    """The option letter MMBench's evaluator reads without a judge LLM (lmms-eval's
    `mmbench_*_static` tasks): `can_infer_option`, else `can_infer_text` over `options`
    (letter -> text, the question's A-D that exist), else `extract_mcq_answer` over those letters.
    May return `E` (the evaluator's "none of them"), which is never an answer. None: nothing read."""
    return _mmbench_letter(reply) or _mmbench_text(reply, dict(options)) or _mcq_extract(reply, sorted(options))
