"""Views: the ways one decoded shard sample is read as chats, in a registry swapped by name.

A shard sample can be read several ways: as a caption (stage-1 alignment), as its instruction
conversation (stage 2), or as its multiple-choice questions (evaluation). The view is data
configuration (`data.train_view`, `data.eval_view`, a mixture source's `view`), so one shard set
serves every stage.

A view is a function `(record, images, settings) -> list[Chat]`, registered by name:

    @VIEWS.register("my_view")
    def my_view(record: dict, images: list[Image.Image], settings: ViewSettings) -> list[Chat]:
        return [Chat([{"from": "human", "value": ...}, {"from": "gpt", "value": ...}])]

Each chat becomes one training example (the template renders it, the replies are supervised).
A chat that carries `mc` is a multiple-choice question, ranked or read as `data.mc_format` says.
A record the view cannot read raises `SampleError` (`src.data.records` checks the usual fields):
the stream counts it under its reason and goes on. A view registered in the user's own module
is chosen by its name once that module is imported (docs/extending.md).

`prompt` (prediction: the chat without its last reply) is not a view of this registry: it
encodes a generation prompt rather than chats, and is handled by `src.data.samples`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from PIL import Image

from src.data import records
from src.data.conversation import IMAGE_TAG, SampleError, multiple_choice_answer, multiple_choice_prompt
from src.registry import Registry

PROMPT_VIEW = "prompt"  # prediction: the chat without its last reply, which becomes the reference
IMAGE_POSITIONS = ("first", "last")


@dataclass(frozen=True)
class ViewSettings:
    """The data options a view may read; the datamodule fills them from `data:`."""

    mc_format: str = "letter"
    """How multiple choice is asked and answered (`letter`, `option`, `reasoned`: `MC_FORMATS`)."""
    image_position: str = "first"
    """Where a view that writes its own question puts the image tags: `first` or `last`."""


class Chat(NamedTuple):
    """One example's conversation, in LLaVA's `{"from": "human" | "gpt", "value": ...}` messages,
    one `<image>` tag per image of the sample."""

    messages: list[dict]
    mc: dict | None = None
    """A multiple-choice question: `{"options": [str], "answer": index, "type": str | list}`; the
    example then carries every option's reply ids, so evaluation ranks them."""


View = Callable[[dict, list[Image.Image], ViewSettings], list[Chat]]


class ViewRegistry(Registry[View]):
    """The views by name, listed in the order they were registered (the built-ins first, in the
    order the docs give them), and iterable over those names."""

    def register(self, name: str) -> Callable[[View], View]:
        if name == PROMPT_VIEW:
            raise ValueError(f"view name {PROMPT_VIEW!r} is taken by prediction (the chat without its last reply)")
        return super().register(name)

    def names(self) -> list[str]:
        return list(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


VIEWS = ViewRegistry("view")


def image_tags(count: int) -> str:
    """One `<image>` tag per image, a line each."""
    return "\n".join(IMAGE_TAG for _ in range(count))


def require_image(images: list[Image.Image]) -> None:
    """For views that make no sense without an image (a caption of nothing would train the model
    to describe nothing): the sample is skipped as `missing_image`."""
    if not images:
        raise SampleError("missing_image", "the sample holds no image; the view needs one")


@VIEWS.register("conversations")
def conversations(record: dict, images: list[Image.Image], settings: ViewSettings) -> list[Chat]:
    """The record's own instruction conversation (stage 2), its `<image>` tags where it put them."""
    return [Chat(records.conversation(record))]


@VIEWS.register("caption")
def caption(record: dict, images: list[Image.Image], settings: ViewSettings) -> list[Chat]:
    """The images, then the caption as the reply (stage-1 alignment; `plain` drops the human turn)."""
    require_image(images)
    text = records.caption(record)
    return [Chat([{"from": "human", "value": image_tags(len(images))}, {"from": "gpt", "value": text}])]


@VIEWS.register("mc")
def multiple_choice(record: dict, images: list[Image.Image], settings: ViewSettings) -> list[Chat]:
    """One chat per multiple-choice question: the images (first or last), the question, its lettered
    options and the format's instruction; the reply is the answer in `settings.mc_format`."""
    chats = []
    tags = image_tags(len(images))
    for mc in records.questions(record):
        options = list(mc.options)
        text = multiple_choice_prompt(mc.question, options, settings.mc_format)
        prompt = f"{tags}\n{text}" if settings.image_position == "first" else f"{text}\n{tags}"
        reply = multiple_choice_answer(options, mc.answer, settings.mc_format)
        messages = [{"from": "human", "value": prompt.strip("\n")}, {"from": "gpt", "value": reply}]
        kind = list(mc.type) if isinstance(mc.type, tuple) else mc.type
        chats.append(Chat(messages, {"options": options, "answer": mc.answer, "type": kind}))
    return chats
