"""What the data pipeline needs of a model, as values: the contract between data and model.

The datamodule turns records into token ids and pixel tensors; for that it needs the
tokenizer, the image transform and how many placeholder tokens an image becomes, and nothing
else of the model. `DataSpec` holds exactly those. Whoever builds a model hands one over
(`LlavaLitModule.data_spec()`, the CLI, a test); the data layer never imports the model, so a
new model family needs no change here, and data code is tested with a tokenizer and a transform
alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Protocol, runtime_checkable

from PIL import Image


@dataclass(frozen=True)
class DataSpec:
    """The model as the data pipeline sees it."""

    tokenizer: Any
    """A transformers tokenizer with the `<image>` token added (`src.data.tokenizer.prepare_tokenizer`)."""
    image_transform: Callable[[Image.Image], Any]
    """PIL image -> (views, 3, H, W) tensor; it runs in loader workers, so it must pickle."""
    image_tokens: int
    """Placeholder tokens one view of an image becomes."""
    image_token_count: Callable[[int, int], int] | None = None
    """(width, height) -> placeholder tokens of the whole image, when that follows its size (anyres);
    None: every image takes `image_tokens` per view. Pickles, like the transform."""

    @classmethod
    def of(cls, value: DataSpec | Mapping[str, Any]) -> DataSpec:
        """A spec from itself or from the mapping of its fields that earlier versions handed around."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"expected a DataSpec or a mapping of its fields, got {type(value).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise TypeError(f"unknown DataSpec fields {unknown}; the fields are {sorted(names)}")
        return cls(**value)

    def __getitem__(self, name: str) -> Any:
        """`spec["tokenizer"]`: the dict-style access of code written when the spec was a dict."""
        if name not in {f.name for f in fields(self)}:
            raise KeyError(name)
        return getattr(self, name)

    @property
    def pad_id(self) -> int:
        """The id padding is filled with: the tokenizer's pad token, else its end of sequence."""
        tokenizer = self.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@runtime_checkable
class DataSpecSource(Protocol):
    """Anything that can say what the data pipeline needs: a LightningModule, a chat session, a test."""

    def data_spec(self) -> DataSpec | Mapping[str, Any]: ...
