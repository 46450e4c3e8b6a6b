"""Conversation templates: render LLaVA-format chats to token ids and a label mask.

Each template turns a chat into segments marked supervised or not, and each segment is
tokenized on its own. That keeps the label mask exact (no character offsets to map back),
which is how LLaVA's own code masks per round, and it makes multi-turn masking a property
of the template rather than of string searching.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

from src.registry import Registry

IGNORE_INDEX = -100
IMAGE_TAG = "<image>"
OPTION_LETTERS = "ABCDEFGH"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
# How a multiple-choice question is asked, answered and scored:
#   letter   - LLaVA's ScienceQA 'CQM-A' format: the reply is the bare letter; the model's
#              choice is the letter it ranks highest.
#   option   - the reply is the option's text, as in LLaVA-1.5's short-answer VQA data; the
#              model's choice is the option whose text it ranks highest (cloze scoring).
#   reasoned - the reply names the answer, then "The answer is X." (as the paper's
#              'QCM-LEA' format ends); the model's choice is the letter its greedy reply names.
MC_FORMATS = {
    "letter": MC_INSTRUCTION,
    "option": "Answer the question using a single word or phrase.",
    "reasoned": "Name the answer, then give the option's letter.",
}
_ANSWER_IS = re.compile(r"The answer is \(?([A-H])\)?")
_LEADING_LETTER = re.compile(r"^\s*([A-H])(?:\.|\s*$)")  # "B" or "B. ..." as LLaVA's scoring reads


def _check_format(fmt: str) -> None:
    if fmt not in MC_FORMATS:
        raise ValueError(f"unknown multiple-choice format {fmt!r}; choose one of {list(MC_FORMATS)}")


def multiple_choice_prompt(question: str, options: list[str], fmt: str = "letter") -> str:
    """The question, one `X. option` line per option, and the format's instruction."""
    _check_format(fmt)
    if not 2 <= len(options) <= len(OPTION_LETTERS):
        raise ValueError(f"a question needs 2 to {len(OPTION_LETTERS)} options, got {len(options)}")
    lines = [question] + [f"{OPTION_LETTERS[i]}. {option}" for i, option in enumerate(options)]
    return "\n".join(lines + [MC_FORMATS[fmt]])


def multiple_choice_answer(options: list[str], answer: int, fmt: str = "letter") -> str:
    _check_format(fmt)
    letter = OPTION_LETTERS[answer]
    if fmt == "letter":
        return letter
    return options[answer] if fmt == "option" else f"{options[answer]}. The answer is {letter}."


def parse_choice(text: str, num_options: int) -> int | None:
    """The chosen option in a reply, as LLaVA's ScienceQA scoring reads it: exactly one
    "The answer is X", else a leading bare letter; anything else is no answer (wrong)."""
    found = _ANSWER_IS.findall(text)
    if len(found) == 1:
        letter = found[0]
    elif not found and (match := _LEADING_LETTER.match(text)):
        letter = match.group(1)
    else:
        return None
    index = OPTION_LETTERS.index(letter)
    return index if index < num_options else None


class SampleError(ValueError):
    """A sample that cannot be used; `reason` is the counter it is skipped under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    num_images: int


Segment = tuple[str, bool]  # (text, supervised)


class Template(ABC):
    """Renders one chat into segments; turns are (human, gpt) pairs."""

    @abstractmethod
    def render(self, turns: list[tuple[str, str]]) -> list[list[Segment]]:
        """One list of segments per turn, so truncation can drop whole turns."""


TEMPLATES: Registry[type[Template]] = Registry("conversation template")


@TEMPLATES.register("plain")
class PlainTemplate(Template):
    """LLaVA's stage-1 format: the image, then the caption; the human text is dropped."""

    def render(self, turns: list[tuple[str, str]]) -> list[list[Segment]]:
        human, gpt = turns[0]
        tags = "".join(IMAGE_TAG for _ in range(human.count(IMAGE_TAG)))
        return [[(tags, False), (gpt.strip(), True)]]


@TEMPLATES.register("vicuna_v1")
class VicunaTemplate(Template):
    """LLaVA-1.5's format: `SYSTEM USER: q ASSISTANT: a</s>USER: ...`."""

    DEFAULT_SYSTEM = (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    )

    def __init__(self, system: str | None = None) -> None:
        self.system = self.DEFAULT_SYSTEM if system is None else system

    def render(self, turns: list[tuple[str, str]]) -> list[list[Segment]]:
        rendered = []
        for i, (human, gpt) in enumerate(turns):
            prefix = f"{self.system} " if i == 0 and self.system else ""
            rendered.append([(f"{prefix}USER: {human} ASSISTANT:", False), (f" {gpt.strip()}", True)])
        return rendered


def build_template(name: str, system: str | None = None) -> Template:
    cls = TEMPLATES.get(name)
    return cls(system=system) if cls is VicunaTemplate else cls()


def to_turns(messages: list[dict]) -> list[tuple[str, str]]:
    """Check a LLaVA `conversations` list and pair it into (human, gpt) turns."""
    if not isinstance(messages, list) or not messages:
        raise SampleError("empty_conversation", "the conversation has no messages")
    if not all(isinstance(m, dict) for m in messages):
        raise SampleError("bad_conversation", "messages must be objects with 'from' and 'value'")
    if messages[0].get("from") == "system":
        messages = messages[1:]
    if len(messages) % 2:
        messages = messages[:-1]  # a trailing question with no answer teaches nothing
    turns = []
    for human, gpt in zip(messages[::2], messages[1::2], strict=False):
        if human.get("from") not in ("human", "user") or gpt.get("from") not in ("gpt", "assistant"):
            raise SampleError(
                "bad_conversation", f"turns must alternate human/gpt, got {human.get('from')!r}, {gpt.get('from')!r}"
            )
        h, g = human.get("value"), gpt.get("value")
        if not isinstance(h, str) or not isinstance(g, str) or not g.strip():
            raise SampleError("empty_conversation", "a turn has no text")
        turns.append((h, g))
    if not turns:
        raise SampleError("empty_conversation", "the conversation has no complete turn")
    return turns


class ConversationEncoder:
    """Tokenizes chats with a template, expands each `<image>` tag and masks labels.

    Given the number of tokens one image becomes (the tower's grid after the projector),
    each tag becomes that many placeholder ids, so the model splices features 1:1.
    """

    def __init__(
        self,
        tokenizer,
        template: Template,
        image_tokens: int,
        max_length: int = 2048,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.image_tokens = image_tokens
        self.max_length = max_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TAG)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {IMAGE_TAG} token; add it as a special token")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token, so answers could not end")

    def _ids(self, text: str, counts: list[int]) -> list[int]:
        """Token ids of `text`; each image tag takes the next per-image count from `counts`."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        out: list[int] = []
        for t in ids:
            out.extend([t] * counts.pop(0) if t == self.image_token_id else [t])
        return out

    def encode(self, messages: list[dict], num_images: int, image_tokens: list[int] | None = None) -> Encoded:
        """`image_tokens` gives each image's token count when they differ (anyres crops)."""
        turns = to_turns(messages)
        tags = sum(h.count(IMAGE_TAG) + g.count(IMAGE_TAG) for h, g in turns)
        if tags != num_images:
            raise SampleError("image_tag_mismatch", f"{tags} {IMAGE_TAG} tags but {num_images} images")
        counts = [self.image_tokens] * num_images if image_tokens is None else list(image_tokens)
        if len(counts) != num_images:
            raise ValueError(f"{len(counts)} image token counts for {num_images} images")
        input_ids: list[int] = [] if self.tokenizer.bos_token_id is None else [self.tokenizer.bos_token_id]
        labels: list[int] = [IGNORE_INDEX] * len(input_ids)
        images_kept = 0
        for segments in self.template.render(turns):
            turn_ids: list[int] = []
            turn_labels: list[int] = []
            images_in_turn = 0
            for text, supervised in segments:
                images_in_turn += text.count(IMAGE_TAG)
                ids = self._ids(text, counts)
                if supervised:
                    ids = ids + [self.tokenizer.eos_token_id]
                turn_ids += ids
                turn_labels += ids if supervised else [IGNORE_INDEX] * len(ids)
            if len(input_ids) + len(turn_ids) > self.max_length:
                break  # drop this turn and the rest: a cut turn would teach a cut answer
            input_ids += turn_ids
            labels += turn_labels
            images_kept += images_in_turn
        if all(label == IGNORE_INDEX for label in labels):
            raise SampleError("too_long", f"the first turn alone exceeds max_length={self.max_length}")
        if images_kept != num_images:
            raise SampleError("too_long", f"truncation to max_length={self.max_length} would drop an image")
        return Encoded(input_ids, labels, num_images)
