"""Conversation templates: render LLaVA-format chats to token ids and a label mask.

A template renders a chat to text, cut into segments marked supervised or not. The encoder
tokenizes the whole text at once, as the reference code does (LLaVA's `tokenizer_image_token`
for the LLaVA-named templates, `apply_chat_template` / a transformers processor for
`chat_template`), and supervises the tokens that start inside a supervised segment (character
offsets). Tokenizing segments one by one would be simpler, but a SentencePiece tokenizer gives
different ids for a segment alone than in context (`</s>USER` vs `▁US ER`), so the model would
see prompts its reference never produced. docs/fidelity.md says what "LLaVA-exact" covers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from src.core.constants import IGNORE_INDEX, IMAGE_TAG  # noqa: F401  (re-exported: the data API in one place)
from src.registry import Registry

OPTION_LETTERS = "ABCDEFGH"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
# How a multiple-choice question is asked, answered and scored:
#   letter   - LLaVA's ScienceQA 'CQM-A' format: the reply is the bare letter; the model's
#              choice is the letter it ranks highest.
#   option   - the reply is the option's text, as in LLaVA-1.5's short-answer VQA data; the
#              model's choice is the option whose text it ranks highest (cloze scoring).
#   reasoned - the reply names the answer, then "The answer is X." (as the paper's
#              'QCM-LEA' format ends); the model's choice is the letter its greedy reply names,
#              read by src/eval/answers.py (LLaVA's eval_science_qa.py rule) in validation.
MC_FORMATS = {
    "letter": MC_INSTRUCTION,
    "option": "Answer the question using a single word or phrase.",
    "reasoned": "Name the answer, then give the option's letter.",
}


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
    text: str = ""  # encode_prompt: the prompt as the model reads it (bos included, one <image> per image)


Segment = tuple[str, bool]  # (text, supervised)


class Template(ABC):
    """Renders one chat into segments; turns are (human, gpt) pairs.

    The class attributes tell the encoder how the reference tokenizes the text: whether it
    adds the tokenizer's bos (the text of a chat template may already hold it), whether each
    text chunk between `<image>` tags is tokenized on its own (LLaVA's `tokenizer_image_token`
    does; a transformers processor does not), and which strings in the text must be read as
    one special token each.
    """

    adds_bos: bool = True  # the encoder prepends the tokenizer's bos, if it has one
    appends_end_token: bool = False  # the rendered replies end with the tokenizer's eos (checked at start-up)
    control_tokens: tuple[str, ...] = ()  # strings in the text the tokenizer must read as one token each
    tokenizes_images_apart: bool = False  # LLaVA's rule: split the text at <image>, tokenize each chunk alone

    @classmethod
    def build(cls, system: str | None, tokenizer) -> Template:
        """Builds the template from the data options; templates without a system prompt ignore it."""
        return cls()

    @abstractmethod
    def render(self, turns: list[tuple[str, str]]) -> list[list[Segment]]:
        """One list of segments per turn, so truncation can drop whole turns."""


TEMPLATES: Registry[type[Template]] = Registry("conversation template")


def image_first(text: str) -> str:
    """A message as LLaVA's `preprocess_multimodal` writes it: its one `<image>` tag moved to the
    front, then a newline, then the rest of the text stripped. A message with several tags is
    left as it is (LLaVA would collapse them into one tag; LLaVA-NeXT leaves them in place)."""
    if text.count(IMAGE_TAG) != 1:
        return text
    return (IMAGE_TAG + "\n" + text.replace(IMAGE_TAG, "").strip()).strip()


class LlavaTemplate(Template):
    """A template named after one of LLaVA's: its text is the official `Conversation.get_prompt()`
    after `preprocess_multimodal`, and it is tokenized as `tokenizer_image_token` does."""

    tokenizes_images_apart = True

    def llava_turns(self, turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(image_first(human), image_first(gpt)) for human, gpt in turns]


@TEMPLATES.register("plain")
class PlainTemplate(LlavaTemplate):
    r"""LLaVA's stage-1 format (`preprocess_plain`): bos, the image, then the caption and `\n`.

    The human text is dropped, the caption is supervised with its newline and no eos, and only
    the first turn is used (LLaVA's stage-1 data has one caption per image).
    """

    def render(self, turns: list[tuple[str, str]]) -> list[list[Segment]]:
        human, gpt = turns[0]
        tags = IMAGE_TAG * human.count(IMAGE_TAG)
        return [[(tags, False), (image_first(gpt) + "\n", True)]]


class SystemPromptTemplate(LlavaTemplate):
    """A template with a system prompt: `DEFAULT_SYSTEM` unless one is given."""

    DEFAULT_SYSTEM = ""

    def __init__(self, system: str | None = None) -> None:
        self.system = self.DEFAULT_SYSTEM if system is None else system

    @classmethod
    def build(cls, system: str | None, tokenizer) -> Template:
        return cls(system)


@TEMPLATES.register("vicuna_v1")
class VicunaTemplate(SystemPromptTemplate):
    """LLaVA-1.5's format (`conv_vicuna_v1`, trained with `--version v1`):
    `{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>`.

    Each reply is supervised from the space after `ASSISTANT:` through `</s>`. As in LLaVA, an
    empty system prompt leaves the space that follows it (the text starts with ` USER:`).
    """

    DEFAULT_SYSTEM = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    control_tokens = ("</s>",)

    def render(self, turns: list[tuple[str, str]]) -> list[list[Segment]]:
        rendered = []
        for i, (human, gpt) in enumerate(self.llava_turns(turns)):
            prefix = f"{self.system} " if i == 0 else ""
            rendered.append([(f"{prefix}USER: {human} ASSISTANT:", False), (f" {gpt}</s>", True)])
        return rendered


@TEMPLATES.register("llama2")
class Llama2Template(SystemPromptTemplate):
    r"""LLaVA's `llava_llama_2` format, which is Llama-2-chat's:
    `<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{q1} [/INST] {a1} </s><s>[INST] {q2} [/INST] {a2} </s>`.

    The first `<s>` is the tokenizer's bos (LLaVA strips it from the text); later rounds write
    `<s>` in the text. Each reply is supervised from the space after `[/INST]` through `</s>`,
    as `preprocess_llama_2` masks it. An empty system prompt drops the `<<SYS>>` block.
    """

    DEFAULT_SYSTEM = (
        "You are a helpful language and vision assistant. "
        "You are able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language."
    )
    control_tokens = ("<s>", "</s>")

    def render(self, turns: list[tuple[str, str]]) -> list[list[Segment]]:
        rendered = []
        for i, (human, gpt) in enumerate(self.llava_turns(turns)):
            system = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n" if i == 0 and self.system else ""
            opening = "" if i == 0 else "<s>"
            rendered.append([(f"{opening}[INST] {system}{human} [/INST]", False), (f" {gpt} </s>", True)])
        return rendered


@TEMPLATES.register("chat_template")
class ChatTemplate(Template):
    """The tokenizer's own Jinja chat template (Llama-3, Qwen ChatML, Gemma, ...).

    The rendered text is what `tokenizer.apply_chat_template` writes for the same messages.
    Jinja gives no spans, so each turn is cut out by string difference: the chat so far
    rendered with the generation header (the prompt) and then with the reply. The reply
    segment is what the template writes for the assistant, end-of-turn marker included;
    whitespace after the marker (ChatML's newline) is context, since generation stops at
    the marker. That only works if a rendered chat is a prefix of its continuation, so
    every render checks it: templates that rewrite history (dropping earlier reasoning,
    say) are refused. The text carries the template's own special tokens, so the encoder
    adds bos only if the template does not write it and the tokenizer would add it on
    its own (as `tokenizer(text)` does), and eos only if replies have no end marker.
    Templates that read message content as a list of parts (a transformers processor's
    template, such as llava-hf's) are detected at start-up and given that shape: each
    `<image>` tag becomes an image part, the rest one text part.
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
        self.appends_end_token = False
        self.content_parts = False  # messages' content as a string, or as a list of parts (a processor's shape)
        try:
            probe = self.render(self.PROBE)  # a template that rewrites history fails here, at start-up
        except Exception as as_string:  # noqa: BLE001 - any failure: try the other content shape
            self.content_parts = True
            try:
                probe = self.render(self.PROBE)
            except Exception:  # noqa: BLE001
                self.content_parts = False
                raise as_string from None
        bos = tokenizer.bos_token
        adds_own_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
        self.adds_bos = adds_own_bos and not probe[0][0][0].startswith(bos)
        self.appends_end_token = probe[0][1][0].endswith(self.PROBE[0][1])  # the reply has no end marker

    @classmethod
    def build(cls, system: str | None, tokenizer) -> Template:
        return cls(tokenizer, system)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _message(self, role: str, text: str) -> dict:
        """A message in the shape the template reads. A processor's template (llava-hf's, for one) reads
        content as a list of parts: one `{"type": "image"}` per `<image>` tag, then the text without the
        tags, as `processor.apply_chat_template` is given it; the template writes the image tokens itself."""
        if not self.content_parts:
            return {"role": role, "content": text}
        images = [{"type": "image"}] * text.count(IMAGE_TAG)
        rest = text.replace(IMAGE_TAG, "").strip() if images else text
        return {"role": role, "content": [*images, {"type": "text", "text": rest}]}

    def _refuse(self, why: str) -> ValueError:
        return ValueError(f"the chat template of {self.name!r} {why}, so replies cannot be masked by prefix")

    def render(self, turns: list[tuple[str, str]]) -> list[list[Segment]]:
        messages = [] if self.system is None else [self._message("system", self.system)]
        rendered: list[list[Segment]] = []
        previous = ""
        for human, gpt in turns:
            messages.append(self._message("user", human))
            prompt = self._render(messages, add_generation_prompt=True)
            messages.append(self._message("assistant", gpt))
            full = self._render(messages, add_generation_prompt=False)
            if not prompt.startswith(previous):
                raise self._refuse("rewrites earlier turns as the chat grows")
            if not full.startswith(prompt):
                raise self._refuse("renders a reply without the generation prompt it asks for")
            question, answer = prompt[len(previous) :], full[len(prompt) :]
            if gpt.strip() not in answer:
                raise self._refuse("does not render assistant replies verbatim")
            if question.count(IMAGE_TAG) != human.count(IMAGE_TAG):
                raise self._refuse(f"does not pass {IMAGE_TAG} tags through unchanged")
            end = len(answer.rstrip())
            reply = answer[:end] + (self.tokenizer.eos_token if self.appends_end_token else "")
            segments = [(question, False), (reply, True), (answer[end:], False)]
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
    if not isinstance(messages, list):
        raise SampleError("bad_conversation", f"'conversations' must be a list, got {type(messages).__name__}")
    if not messages:
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
    each tag becomes that many placeholder ids, so the model splices features 1:1. The label
    mask needs character offsets, so the tokenizer must be a `tokenizers`-backed one (every
    transformers 5 tokenizer of a Llama, Qwen, Gemma, ... is).
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
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"the tokenizer {type(tokenizer).__name__} gives no character offsets, which label masks need; "
                "load a tokenizers-backed one (AutoTokenizer does by default)"
            )
        for token in template.control_tokens:
            if len(tokenizer(token, add_special_tokens=False)["input_ids"]) != 1:
                raise ValueError(f"the template writes {token!r}, which the tokenizer does not read as one token")

    def _tokenize(self, text: str, counts: list[int]) -> tuple[list[int], list[int]]:
        """Token ids of `text`, each image tag expanded to the next count of `counts`, and the
        character where each token starts. LLaVA's templates tokenize each chunk between tags on
        its own (`tokenizer_image_token`); others tokenize the text whole (a processor's rule)."""
        ids: list[int] = []
        starts: list[int] = []
        chunks = text.split(IMAGE_TAG) if self.template.tokenizes_images_apart else [text]
        offset = 0
        for k, chunk in enumerate(chunks):
            if k:
                ids += [self.image_token_id] * counts.pop(0)
                starts += [offset - len(IMAGE_TAG)] * (len(ids) - len(starts))
            encoded = self.tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
            for token, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
                n = counts.pop(0) if token == self.image_token_id else 1
                ids += [token] * n
                starts += [offset + start] * n
            offset += len(chunk) + len(IMAGE_TAG)
        return ids, starts

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

    def _encode_segments(
        self, rendered: list[list[Segment]], counts: list[int], opening: list[int]
    ) -> tuple[list[int], list[int], list[int], list[int]]:
        """Ids and labels of the rendered turns; per turn, the token index where it ends and the
        images it holds. A token is supervised when it starts inside a supervised segment."""
        text = ""
        spans: list[tuple[int, int]] = []
        turn_ends: list[int] = []
        turn_images: list[int] = []
        for segments in rendered:
            for segment, supervised in segments:
                if supervised:
                    spans.append((len(text), len(text) + len(segment)))
                text += segment
            turn_ends.append(len(text))
            turn_images.append(sum(segment.count(IMAGE_TAG) for segment, _ in segments))
        ids, starts = self._tokenize(text, counts)
        labels = [
            token if token != self.image_token_id and any(a <= s < b for a, b in spans) else IGNORE_INDEX
            for token, s in zip(ids, starts, strict=True)
        ]
        token_ends = [len(opening) + sum(1 for s in starts if s < end) for end in turn_ends]
        return opening + ids, [IGNORE_INDEX] * len(opening) + labels, token_ends, turn_images

    def encode(self, messages: list[dict], num_images: int, image_tokens: list[int] | None = None) -> Encoded:
        """`image_tokens` gives each image's token count when they differ (anyres crops).

        Turns that do not fit `max_length` are dropped whole, with every turn after them: a cut
        turn would teach a cut answer.
        """
        turns = to_turns(messages)
        counts, opening = self._start(turns, num_images, image_tokens)
        input_ids, labels, turn_ends, turn_images = self._encode_segments(self.template.render(turns), counts, opening)
        kept = sum(1 for end in turn_ends if end <= self.max_length)
        if kept == 0:
            raise SampleError("too_long", f"the first turn alone exceeds max_length={self.max_length}")
        if sum(turn_images[:kept]) != num_images:
            raise SampleError("too_long", f"truncation to max_length={self.max_length} would drop an image")
        end = turn_ends[kept - 1]
        if all(label == IGNORE_INDEX for label in labels[:end]):
            raise SampleError("empty_conversation", "no token of the replies is supervised")
        return Encoded(input_ids[:end], labels[:end], num_images)

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
        counts, opening = self._start(turns, num_images, image_tokens)
        rendered = self.template.render(turns)
        last = rendered[-1]
        reply = next(i for i, (_, supervised) in enumerate(last) if supervised)
        prompt = [*rendered[:-1], last[:reply]]
        input_ids, _, _, _ = self._encode_segments(prompt, counts, opening)
        if len(input_ids) > self.max_length:
            raise SampleError("too_long", f"the prompt has {len(input_ids)} tokens, max_length={self.max_length}")
        text = (self.tokenizer.bos_token if opening else "") + "".join(t for turn in prompt for t, _ in turn)
        return Encoded(input_ids, [IGNORE_INDEX] * len(input_ids), num_images, text)
