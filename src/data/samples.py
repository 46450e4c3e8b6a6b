"""From a decoded shard sample to model-ready examples, one per chat of each chosen view.

The views (how a sample is read: caption, conversation, multiple choice, or one the user
registers) live in `src.data.views`; this module applies the image transform and the
conversation encoder to what they return, and makes the `prompt` examples of prediction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from src.data import records
from src.data.conversation import MC_FORMATS, ConversationEncoder, SampleError, multiple_choice_answer
from src.data.views import (  # VIEWS, PROMPT_VIEW, IMAGE_POSITIONS: also imported from here
    IMAGE_POSITIONS,
    PROMPT_VIEW,
    VIEWS,
    Chat,
    ViewSettings,
)

BLANK_GREY = (128, 128, 128)


@dataclass
class Example:
    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None  # (views of all images, 3, H, W); one view per image unless tiled
    mc: dict | None = field(default=None)  # candidates, answer, type, format for multiple choice
    meta: dict | None = field(default=None)  # prediction: id, prompt (text), reference; the stream adds key, index
    image_sizes: torch.Tensor | None = field(default=None)
    """(images, 2): each image's (height, width) as decoded, in order, as transformers' LlavaNext takes them;
    anyres + unpad merges an image's views by it. None when the example has no image."""


class ExampleBuilder:
    """Applies the image transform and the conversation encoder to decoded samples."""

    def __init__(
        self,
        encoder: ConversationEncoder,
        image_transform: Callable[[Image.Image], torch.Tensor],
        view: str | list[str],
        blank_images: bool = False,
        mc_format: str = "letter",
        image_position: str = "first",
        image_token_count: Callable[[int, int], int] | None = None,
    ) -> None:
        """`image_token_count`: (width, height) -> an image's placeholder tokens, when they depend on its
        size (anyres: `LlavaModel.image_token_count`); None: `encoder.image_tokens` per view."""
        if image_position not in IMAGE_POSITIONS:
            raise ValueError(f"unknown image_position {image_position!r}; choose one of {list(IMAGE_POSITIONS)}")
        self.image_position = image_position
        views = [view] if isinstance(view, str) else list(view)
        for name in views:
            if name != PROMPT_VIEW:
                VIEWS.get(name)  # an unknown name lists the registered views
        if mc_format not in MC_FORMATS:
            raise ValueError(f"unknown multiple-choice format {mc_format!r}; choose one of {list(MC_FORMATS)}")
        self.mc_format = mc_format
        self.settings = ViewSettings(mc_format=mc_format, image_position=image_position)
        self.encoder = encoder
        self.image_transform = image_transform
        self.views = views
        self.blank_images = blank_images
        self.image_token_count = image_token_count

    @property
    def draft_size(self) -> Callable[[int, int], tuple[int, int] | None] | None:
        """What `decode_sample(raw, draft=...)` may reduce a large JPEG to for this builder's
        image transform; None: decode at full size."""
        return getattr(self.image_transform, "draft_size", None)

    def _reply_ids(self, reply: str) -> list[int]:
        """The supervised ids of a reply (end of turn included), as the template tokenizes it."""
        encoded = self.encoder.encode([{"from": "human", "value": "?"}, {"from": "gpt", "value": reply}], 0)
        return [label for label in encoded.labels if label >= 0]

    def _candidates(self, options: list[str]) -> list[list[int]]:
        """Each option's full reply, for ranking (`letter`, `option`) or counting (`reasoned`)."""
        return [self._reply_ids(multiple_choice_answer(options, k, self.mc_format)) for k in range(len(options))]

    def chats(self, record: dict, images: list[Image.Image]) -> list[Chat]:
        """Every chat of every view of this builder, in order (a view that needs an image, or a
        field the record lacks, raises `SampleError`)."""
        if PROMPT_VIEW in self.views:
            raise ValueError(f"the {PROMPT_VIEW!r} view (prediction) cannot be combined with other views")
        chats = []
        for name in self.views:
            for chat in VIEWS.get(name)(record, images, self.settings):
                if not isinstance(chat, tuple) or len(chat) != 2:  # a bug in the view, not in the data
                    raise TypeError(f"view {name!r} gave a {type(chat).__name__}; a view returns a list of Chat")
                chats.append(Chat(*chat))
        return chats

    def __call__(self, record: dict, images: list[Image.Image]) -> list[Example]:
        records.check_images(record, len(images), needs_image=False)  # views that need one say so
        chats = None if self.views == [PROMPT_VIEW] else self.chats(record, images)
        if self.blank_images:
            images = [Image.new("RGB", image.size, BLANK_GREY) for image in images]
        # a transform gives (3, H, W) or, tiling an image into crops (anyres), (views, 3, H, W);
        # the image's tokens (every view's, or anyres' merge of them) are spliced at its tag
        views = [self.image_transform(image) for image in images]
        views = [v.unsqueeze(0) if v.dim() == 3 else v for v in views]
        pixels = (views[0] if len(views) == 1 else torch.cat(views)) if views else None
        sizes = torch.tensor([[image.height, image.width] for image in images], dtype=torch.long) if images else None
        if self.image_token_count is None:
            counts = [v.shape[0] * self.encoder.image_tokens for v in views]
        else:
            counts = [self.image_token_count(image.width, image.height) for image in images]
        if chats is None:
            return [self._prompt_example(record, len(images), counts, pixels, sizes)]
        examples = []
        for chat, mc in chats:
            encoded = self.encoder.encode(chat, num_images=len(images), image_tokens=counts)
            if mc is not None:
                mc = {"candidates": self._candidates(mc["options"]), "answer": mc["answer"], "type": mc["type"],
                      "format": self.mc_format}  # fmt: skip
            examples.append(
                Example(torch.tensor(encoded.input_ids), torch.tensor(encoded.labels), pixels, mc, image_sizes=sizes)
            )
        return examples

    def _prompt_example(
        self, record: dict, num_images: int, counts: list[int], pixels, sizes: torch.Tensor | None
    ) -> Example:
        """The `prompt` view: the conversation up to its last human turn, encoded with the generation
        prompt; a final gpt turn is dropped and kept as the reference answer."""
        messages = records.conversation(record)
        if not messages:
            raise SampleError("empty_conversation", "the conversation has no messages")
        reference = None
        last = messages[-1]
        if isinstance(last, dict) and last.get("from") in ("gpt", "assistant"):
            reference = last.get("value") if isinstance(last.get("value"), str) else None
            messages = messages[:-1]
        encoded = self.encoder.encode_prompt(messages, num_images=num_images, image_tokens=counts)
        sample_id = record.get("id")
        meta = {
            "id": None if sample_id is None else str(sample_id),
            "prompt": encoded.text,  # the rendered prompt, as the model read it
            "reference": reference,
        }
        ids = torch.tensor(encoded.input_ids)
        return Example(ids, torch.tensor(encoded.labels), pixels, meta=meta, image_sizes=sizes)
