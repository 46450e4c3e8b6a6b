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
    """Renders one chat into segments; turns are (human, gpt) pairs.

    The class attributes tell the encoder which special tokens it must add itself: a
    template whose text already holds them (a tokenizer's chat template, Llama-2's
    per-round `<s>`/`</s>`) must not get a second bos or a stray eos.
    """

    adds_bos: bool = True  # the encoder prepends the tokenizer's bos, if it has one
    appends_end_token: bool = True  # the encoder appends eos after each supervised segment
    control_tokens: tuple[str, ...] = ()  # strings in the text the tokenizer must read as one token each

    @classmethod
    def build(cls, system: str | None, tokenizer) -> Template:
        """Builds the template from the data options; templates without a system prompt ignore it."""
        return cls()

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


class SystemPromptTemplate(Template):
    """A template with a system prompt: `DEFAULT_SYSTEM` unless one is given ("" drops it)."""

    DEFAULT_SYSTEM = ""

    def __init__(self, system: str | None = None) -> None:
        self.system = self.DEFAULT_SYSTEM if system is None else system

    @classmethod
    def build(cls, system: str | None, tokenizer) -> Template:
        return cls(system)


@TEMPLATES.register("vicuna_v1")
class VicunaTemplate(SystemPromptTemplate):
    """LLaVA-1.5's format: `SYSTEM USER: q ASSISTANT: a</s>USER: ...`."""

    DEFAULT_SYSTEM = (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    )

    def render(self, turns: list[tuple[str, str]]) -> list[list[Segment]]:
        rendered = []
        for i, (human, gpt) in enumerate(turns):
            prefix = f"{self.system} " if i == 0 and self.system else ""
            rendered.append([(f"{prefix}USER: {human} ASSISTANT:", False), (f" {gpt.strip()}", True)])
        return rendered


@TEMPLATES.register("llama2")
class Llama2Template(SystemPromptTemplate):
    r"""LLaVA's `llava_llama_2` format, which is Llama-2-chat's:
    `<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{q1} [/INST] {a1} </s><s>[INST] {q2} [/INST] {a2} </s>`.

    Every round opens with `<s>` and closes with `</s>`, so the template writes both itself
    rather than have the encoder add one bos per sequence. The reply is supervised from the
    space after `[/INST]` through `</s>`, as LLaVA's `preprocess_llama_2` masks it. An empty
    system prompt drops the `<<SYS>>` block, as Llama-2-chat's own template does.
    """

    DEFAULT_SYSTEM = (
        "You are a helpful language and vision assistant. "
        "You are able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language."
    )
    adds_bos = False
    appends_end_token = False
    control_tokens = ("<s>", "</s>")

    def render(self, turns: list[tuple[str, str]]) -> list[list[Segment]]:
        rendered = []
        for i, (human, gpt) in enumerate(turns):
            system = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n" if i == 0 and self.system else ""
            rendered.append([(f"<s>[INST] {system}{human} [/INST]", False), (f" {gpt.strip()} </s>", True)])
        return rendered


@TEMPLATES.register("chat_template")
class ChatTemplate(Template):
    """The tokenizer's own Jinja chat template (Llama-3, Qwen ChatML, Gemma, ...).

    Jinja gives no spans, so each turn is cut out by string difference: the chat so far
    rendered with the generation header (the prompt) and then with the reply. The reply
    segment is what the template writes for the assistant, end-of-turn marker included;
    whitespace after the marker (ChatML's newline) is context, since generation stops at
    the marker. That only works if a rendered chat is a prefix of its continuation, so
    every render checks it: templates that rewrite history (dropping earlier reasoning,
    say) are refused. The text carries the template's own special tokens, so the encoder
    adds bos only if the template does not write it and the tokenizer would add it on
    its own (as `tokenizer(text)` does), and eos only if replies have no end marker.
    """

    PROBE = [("Probe question one?", "Probe answer one."), ("Probe question two?", "Probe answer two.")]

    def __init__(self, tokenizer, system: str | None = None) -> None:
        if tokenizer is None:
            raise ValueError("the chat_template template renders with a tokenizer; pass build_template(tokenizer=...)")
        self.name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        if not getattr(tokenizer, "chat_template", None):
            others = ", ".join(name for name in TEMPLATES.names() if name != "chat_template")
            raise ValueError(
                f"tokenizer {self.name!r} has no chat_template, so the chat_template template cannot render; "
                f"choose another data.template ({others})"
            )
        self.tokenizer = tokenizer
        self.system = system  # None: the template's own default; a string (even ""): that system message
        probe = self.render(self.PROBE)  # a template that rewrites history fails here, at start-up
        bos = tokenizer.bos_token
        adds_own_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
        self.adds_bos = adds_own_bos and not probe[0][0][0].startswith(bos)
        self.appends_end_token = probe[0][1][0].endswith(self.PROBE[0][1])  # the reply has no end marker

    @classmethod
    def build(cls, system: str | None, tokenizer) -> Template:
        return cls(tokenizer, system)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _refuse(self, why: str) -> ValueError:
        return ValueError(f"the chat template of {self.name!r} {why}, so replies cannot be masked by prefix")

    def render(self, turns: list[tuple[str, str]]) -> list[list[Segment]]:
        messages = [] if self.system is None else [{"role": "system", "content": self.system}]
        rendered: list[list[Segment]] = []
        previous = ""
        for human, gpt in turns:
            reply = gpt.strip()
            messages.append({"role": "user", "content": human})
            prompt = self._render(messages, add_generation_prompt=True)
            messages.append({"role": "assistant", "content": reply})
            full = self._render(messages, add_generation_prompt=False)
            if not prompt.startswith(previous):
                raise self._refuse("rewrites earlier turns as the chat grows")
            if not full.startswith(prompt):
                raise self._refuse("renders a reply without the generation prompt it asks for")
            question, answer = prompt[len(previous) :], full[len(prompt) :]
            if reply not in answer:
                raise self._refuse("does not render assistant replies verbatim")
            if question.count(IMAGE_TAG) != human.count(IMAGE_TAG):
                raise self._refuse(f"does not pass {IMAGE_TAG} tags through unchanged")
            end = len(answer.rstrip())
            segments = [(question, False), (answer[:end], True), (answer[end:], False)]
            rendered.append([segment for segment in segments if segment[0]])
            previous = full
        return rendered


def build_template(name: str, system: str | None = None, tokenizer=None) -> Template:
    """The template registered as `name`; `system` replaces its system prompt where it has one
    ("" drops it, except for chat_template where it is an empty system message), and
    `tokenizer` is needed by `chat_template`, which renders with it."""
    return TEMPLATES.get(name).build(system, tokenizer)


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
        if template.appends_end_token and tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token, so answers could not end")
        for token in template.control_tokens:
            if len(tokenizer(token, add_special_tokens=False)["input_ids"]) != 1:
                raise ValueError(f"the template writes {token!r}, which the tokenizer does not read as one token")

    def _ids(self, text: str, counts: list[int]) -> list[int]:
        """Token ids of `text`; each image tag takes the next per-image count from `counts`."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        out: list[int] = []
        for t in ids:
            out.extend([t] * counts.pop(0) if t == self.image_token_id else [t])
        return out

    def _start(
        self, turns: list[tuple[str, str]], num_images: int, image_tokens: list[int] | None
    ) -> tuple[list[int], list[int]]:
        """Checks the tags against the images; each image's token count, and the opening ids (bos)."""
        tags = sum(h.count(IMAGE_TAG) + g.count(IMAGE_TAG) for h, g in turns)
        if tags != num_images:
            raise SampleError("image_tag_mismatch", f"{tags} {IMAGE_TAG} tags but {num_images} images")
        counts = [self.image_tokens] * num_images if image_tokens is None else list(image_tokens)
        if len(counts) != num_images:
            raise ValueError(f"{len(counts)} image token counts for {num_images} images")
        bos = self.tokenizer.bos_token_id
        return counts, [bos] if self.template.adds_bos and bos is not None else []

    def encode(self, messages: list[dict], num_images: int, image_tokens: list[int] | None = None) -> Encoded:
        """`image_tokens` gives each image's token count when they differ (anyres crops)."""
        turns = to_turns(messages)
        counts, input_ids = self._start(turns, num_images, image_tokens)
        labels: list[int] = [IGNORE_INDEX] * len(input_ids)
        images_kept = 0
        for segments in self.template.render(turns):
            turn_ids: list[int] = []
            turn_labels: list[int] = []
            images_in_turn = 0
            for text, supervised in segments:
                images_in_turn += text.count(IMAGE_TAG)
                ids = self._ids(text, counts)
                if supervised and self.template.appends_end_token:
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

    def encode_prompt(self, messages: list[dict], num_images: int, image_tokens: list[int] | None = None) -> Encoded:
        """A chat ending with a human turn, as the model sees it before replying: earlier turns in
        full, then the last question with the template's generation prompt (`ASSISTANT:`,
        `[/INST]`, a chat template's assistant header). No label is supervised.

        The template renders the last turn with a placeholder reply, and everything before that
        reply is the prompt, so generation starts exactly where training supervised the reply.
        """
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
            raise SampleError("empty_conversation", "the prompt has no messages")
        if messages[-1].get("from") not in ("human", "user"):
            raise SampleError("bad_conversation", "a prompt must end with a human turn")
        turns = to_turns([*messages, {"from": "gpt", "value": "reply"}])
        counts, input_ids = self._start(turns, num_images, image_tokens)
        rendered = self.template.render(turns)
        for i, segments in enumerate(rendered):
            for text, supervised in segments:
                if supervised and i == len(rendered) - 1:
                    break  # the placeholder reply: the prompt ends before it
                ids = self._ids(text, counts)
                if supervised and self.template.appends_end_token:
                    ids = ids + [self.tokenizer.eos_token_id]
                input_ids += ids
        if len(input_ids) > self.max_length:
            raise SampleError("too_long", f"the prompt has {len(input_ids)} tokens, max_length={self.max_length}")
        return Encoded(input_ids, [IGNORE_INDEX] * len(input_ids), num_images)
