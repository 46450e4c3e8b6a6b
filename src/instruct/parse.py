"""The teacher's reply -> a LLaVA conversation, and the checks it must pass to be kept.

A reply in `Question:` / `Answer:` blocks (conversation, complex reasoning; `===` lines
between blocks are optional) becomes alternating human/gpt turns; a `detail` reply is the
answer to a question drawn from the question list (`src.instruct.sampling.pick_question`).
The image tag opens the first human turn, `"<image>\\n..."`, or, with `image_position: random`,
closes it for about half the samples, `"...\\n<image>"` (the paper's Eq. 2; both forms are in
LLaVA-Instruct-158K).

A conversation that fails a check raises `Rejected` with a reason the generator counts:
- bad_format: no Question/Answer blocks, or text before the first one
- bad_alternation: turns not human, gpt, human, gpt ... ending with gpt
- empty_turn: a turn with no text
- image_tag: not exactly one `<image>`, where `image_position` puts it in the first human turn
- too_few_turns / too_many_turns: question-answer pairs outside the kind's bounds
- too_short / too_long: all answers together outside the kind's character bounds
- leaked_caption: speaks of the captions or descriptions it was given as its source ("the
  caption says", "according to the descriptions", "the given sentences"), not of the image;
  a caption or text seen in the image ("the caption on the poster", "text above the door")
  is ordinary content
- leaked_coordinates: speaks of bounding boxes or coordinates, writes a bracketed list of
  numbers in 0-1 (`[0.41, 0.28, ...]`, `(0.41, 0.28)`), or copies a coordinate the teacher was
  shown for this image (`0.412`, `0.1` ...) other than as a quantity with a unit ("0.75 liter",
  "0.5 m", "$0.25"); numbers the teacher was not shown are never leaks
- truncated: the teacher stopped at its token limit (`finish_reason: length`); decided by the
  generator, which asks again with a larger limit (see `src.instruct.generate`)
"""

from __future__ import annotations

import re
from collections.abc import Collection

from src.data.conversation import IMAGE_TAG
from src.instruct.prompts import KindSpec

_LABEL = re.compile(r"^[ \t]*(?:\*\*)?(question|answer)(?:\*\*)?[ \t]*:(?:\*\*)?[ \t]*", re.IGNORECASE | re.MULTILINE)
_SEPARATOR = re.compile(r"^[ \t]*===+[ \t]*$", re.MULTILINE)
_SOURCES = r"(?:captions?|descriptions?|sentences|annotations?)"
LEAKED_CAPTION = re.compile(
    # the captions cited as a source: "the caption says", "the captions mention"
    r"\bcaptions? (?:says?|said|mentions?|mentioned|describes?|described|states?|stated|notes?|noted"
    r"|indicates?|indicated|suggests?|suggested|tells?|told|provided|given|supplied)\b"
    # "according to the captions", "as described in the sentences", "judging from the descriptions"
    r"|\b(?:according to|based on|judging (?:by|from)|as (?:described|mentioned|stated|noted|given|listed|shown)"
    r" (?:in|by)|(?:described|mentioned|stated|listed|noted) in) (?:the |these |those |all |both )?(?:\w+ )?"
    + _SOURCES
    + r"\b"
    # "the given sentences", "the descriptions provided", "the above text", "the information provided"
    r"|\b(?:given|provided|supplied|aforementioned|above) (?:captions?|sentences|descriptions?|annotations?"
    r"|text|information)\b|\bfollowing (?:captions|sentences|descriptions|annotations)\b"
    r"|\b(?:captions?|sentences|descriptions?|annotations?|text|information) (?:given|provided|supplied)\b"
    r"|\b(?:in|from|by) (?:the|these|those|all|both|all the|all five) (?:captions|sentences|descriptions)\b"
    r"|\b(?:the|these|those|five) sentences\b|\bimage (?:captions?|descriptions?)\b",
    re.IGNORECASE,
)
LEAKED_COORDINATES = re.compile(r"\bbounding[ -]box(?:es)?\b|\bcoordinates?\b", re.IGNORECASE)
_BRACKETED = re.compile(r"[\[(]([^\[\]()]{1,120})[\])]")
_NUMBER = re.compile(r"(?<![\w.])(\d*\.\d+)(?!\w|\.\d)")
_UNIT = re.compile(
    r"\s*(?:%|percent\b|[kcm]?(?:l|m|g)\b|(?:kilo|centi|milli)?(?:liters?|litres?|meters?|metres?|grams?)\b"
    r"|km/h|kph\b|mph\b|oz\b|ounces?\b|lbs?\b|pounds?\b|ft\b|feet\b|foot\b|inch(?:es)?\b|miles?\b|mi\b"
    r"|gal(?:lons?)?\b|cups?\b|tbsp\b|tsp\b|s\b|secs?\b|seconds?\b|min(?:utes?)?\b|h\b|hrs?\b|hours?\b"
    r"|days?\b|weeks?\b|years?\b|carats?\b|ct\b|volts?\b|v\b|watts?\b|w\b|x\b|times\b|dollars?\b"
    r"|euros?\b|cents?\b|degrees?\b|°)",
    re.IGNORECASE,
)


def coordinate_leak(text: str, shown: Collection[float] = ()) -> str | None:
    """The part of `text` that gives away box coordinates, or None (rules in the module doc)."""
    if match := LEAKED_COORDINATES.search(text):
        return match.group(0)
    for match in _BRACKETED.finditer(text):
        parts = [part.strip() for part in match.group(1).split(",")]
        if len(parts) >= 2 and any("." in part for part in parts) and all(_fraction(part) for part in parts):
            return match.group(0)
    if shown:
        values = set(shown)
        for match in _NUMBER.finditer(text):
            if float(match.group(1)) not in values:
                continue
            before = text[match.start() - 1] if match.start() else ""
            if (before and before in "$€£") or _UNIT.match(text, match.end()):
                continue  # a quantity: "0.75 liter", "$0.25"
            return match.group(0)
    return None


def _fraction(text: str) -> bool:
    try:
        return 0.0 <= float(text) <= 1.0
    except ValueError:
        return False


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


def to_conversation(
    spec: KindSpec, reply: str, question: str | None = None, image_first: bool = True
) -> list[dict[str, str]]:
    """The LLaVA conversation a reply makes (not yet validated). `question` is the human turn of
    a single-answer kind (detail); `image_first` puts `<image>` before the first question, else
    after it."""
    if spec.single_answer:
        if question is None:
            raise ValueError(f"the {spec.kind} kind needs the question its reply answers")
        if _LABEL.search(reply):
            raise Rejected("bad_format", "a description was asked for, the reply has Question/Answer blocks")
        turns = [("human", question), ("gpt", reply.strip())]
    else:
        turns = [("human" if label == "question" else "gpt", body) for label, body in parse_blocks(reply)]
    conversation = [{"from": role, "value": value} for role, value in turns]
    if conversation and conversation[0]["from"] == "human":
        first = conversation[0]["value"]
        conversation[0]["value"] = f"{IMAGE_TAG}\n{first}" if image_first else f"{first}\n{IMAGE_TAG}"
    return conversation


def validate(
    conversation: list[dict[str, str]], spec: KindSpec, shown: Collection[float] = (), image_position: str = "front"
) -> None:
    """Raise Rejected unless the conversation is one the kit should train on. `shown`: the box
    coordinates the teacher saw (`prompts.shown_numbers`); `image_position` "random" lets
    `<image>` close the first human turn as well as open it."""
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
    first = conversation[0]["value"]
    placed = first.startswith(f"{IMAGE_TAG}\n") or (image_position == "random" and first.endswith(f"\n{IMAGE_TAG}"))
    if tags != 1 or not placed:
        where = "opening" if image_position == "front" else "opening or closing"
        raise Rejected("image_tag", f"{tags} {IMAGE_TAG} tags; exactly one, {where} the first human turn, is needed")
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
        if leak := coordinate_leak(text, shown):
            raise Rejected("leaked_coordinates", f"mentions {leak!r}")
