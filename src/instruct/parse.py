"""The teacher's reply -> a LLaVA conversation, and the checks it must pass to be kept.

A reply in `Question:` / `Answer:` blocks (conversation, complex reasoning; `===` lines
between blocks are optional) becomes alternating human/gpt turns; a `detail` reply is the
answer to a question drawn from the kind's list. The image tag goes at the start of the
first human turn: `[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}, ...]`.

A conversation that fails a check raises `Rejected` with a reason the generator counts:
- bad_format: no Question/Answer blocks, or text before the first one
- bad_alternation: turns not human, gpt, human, gpt ... ending with gpt
- empty_turn: a turn with no text
- image_tag: not exactly one `<image>`, at the start of the first human turn
- too_few_turns / too_many_turns: question-answer pairs outside the kind's bounds
- too_short / too_long: all answers together outside the kind's character bounds
- leaked_caption: speaks of captions or the descriptions it was given, not of the image
- leaked_coordinates: speaks of boxes or coordinates, or writes numbers like the boxes'
"""

from __future__ import annotations

import re

from src.data.conversation import IMAGE_TAG
from src.instruct.prompts import KindSpec, pick_question

_LABEL = re.compile(r"^[ \t]*(?:\*\*)?(question|answer)(?:\*\*)?[ \t]*:(?:\*\*)?[ \t]*", re.IGNORECASE | re.MULTILINE)
_SEPARATOR = re.compile(r"^[ \t]*===+[ \t]*$", re.MULTILINE)
LEAKED_CAPTION = re.compile(
    r"\bcaption(?:s|ed)?\b"
    r"|\b(?:given|provided|above|following) (?:sentences|descriptions?|text)\b"
    r"|\b(?:sentences|descriptions?|text) (?:given|provided|above)\b",
    re.IGNORECASE,
)
LEAKED_COORDINATES = re.compile(
    r"\bbounding[ -]box(?:es)?\b|\bcoordinates?\b"
    r"|\[\s*[01]?\.\d+\s*,\s*[01]?\.\d+"  # a bracketed list of fractions
    r"|(?<![\w.])(?:0\.\d{2,}|1\.0{2,})(?![\w.])",  # 0.62, 0.681, 1.000: box-like fractions
    re.IGNORECASE,
)


class Rejected(ValueError):
    """A reply that cannot be used; `reason` is what the summary counts."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def parse_blocks(text: str) -> list[tuple[str, str]]:
    """(label, text) pairs, label 'question' or 'answer', from a reply in Question/Answer blocks."""
    text = _SEPARATOR.sub("", text.strip())
    parts = _LABEL.split(text)
    if len(parts) < 3:
        raise Rejected("bad_format", "no 'Question:' / 'Answer:' blocks in the reply")
    if parts[0].strip():
        raise Rejected("bad_format", f"text before the first block: {parts[0].strip()[:80]!r}")
    return [(label.lower(), body.strip()) for label, body in zip(parts[1::2], parts[2::2], strict=True)]


def to_conversation(spec: KindSpec, item_id: str, reply: str) -> list[dict[str, str]]:
    """The LLaVA conversation a reply makes (not yet validated)."""
    if spec.single_answer:
        if _LABEL.search(reply):
            raise Rejected("bad_format", "a description was asked for, the reply has Question/Answer blocks")
        turns = [("human", pick_question(spec, item_id)), ("gpt", reply.strip())]
    else:
        turns = [("human" if label == "question" else "gpt", body) for label, body in parse_blocks(reply)]
    conversation = [{"from": role, "value": value} for role, value in turns]
    if conversation and conversation[0]["from"] == "human":
        conversation[0]["value"] = f"{IMAGE_TAG}\n{conversation[0]['value']}"
    return conversation


def validate(conversation: list[dict[str, str]], spec: KindSpec) -> None:
    """Raise Rejected unless the conversation is one the kit should train on."""
    if not conversation:
        raise Rejected("bad_format", "the conversation is empty")
    for index, turn in enumerate(conversation):
        expected = "human" if index % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected:
            got = turn.get("from") if isinstance(turn, dict) else turn
            raise Rejected("bad_alternation", f"turn {index} should be {expected}, it is {got!r}")
        if not isinstance(turn.get("value"), str) or not turn["value"].replace(IMAGE_TAG, "").strip():
            raise Rejected("empty_turn", f"turn {index} ({expected}) has no text")
    if len(conversation) % 2:
        raise Rejected("bad_alternation", "the conversation ends with a question and no answer")
    tags = sum(turn["value"].count(IMAGE_TAG) for turn in conversation)
    if tags != 1 or not conversation[0]["value"].startswith(f"{IMAGE_TAG}\n"):
        raise Rejected("image_tag", f"{tags} {IMAGE_TAG} tags; exactly one, opening the first human turn, is needed")
    pairs = len(conversation) // 2
    if pairs < spec.min_turns:
        raise Rejected("too_few_turns", f"{pairs} question-answer pairs, at least {spec.min_turns} needed")
    if pairs > spec.max_turns:
        raise Rejected("too_many_turns", f"{pairs} question-answer pairs, at most {spec.max_turns} allowed")
    chars = sum(len(turn["value"]) for turn in conversation[1::2])
    if chars < spec.min_chars:
        raise Rejected("too_short", f"answers hold {chars} characters, at least {spec.min_chars} needed")
    if chars > spec.max_chars:
        raise Rejected("too_long", f"answers hold {chars} characters, at most {spec.max_chars} allowed")
    for turn in conversation:
        text = turn["value"].replace(IMAGE_TAG, "")
        if match := LEAKED_CAPTION.search(text):
            raise Rejected("leaked_caption", f"mentions {match.group(0)!r}")
        if match := LEAKED_COORDINATES.search(text):
            raise Rejected("leaked_coordinates", f"mentions {match.group(0)!r}")
