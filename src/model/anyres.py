"""LLaVA-NeXT's anyres merge: how the views of one image become its tokens.

`image_mode: anyres` cuts an image into one downscaled base view and the crops of a canvas
chosen for its aspect (`src.model.image_transform.ImageTransform`); every view goes through the tower
and the projector alone. What then reaches the LLM is the merge (`VisionConfig.anyres_merge`):

- `unpad` (LLaVA-NeXT's `spatial_unpad`, transformers' `LlavaNext`): the crops' token grids are
  laid side by side into one (rows x side, cols x side) map of the canvas, the rows and columns
  that only cover the canvas' padding are cut off (`unpad_image`), a learned `image_newline`
  embedding ends every row, and the base view's tokens come first. An image's token count
  then depends on its own size, and is far lower for a thin or a small image.
- `flat` (LLaVA-NeXT's `flat`): every view's tokens in order, `projector.num_tokens` each.

Sizes here are (width, height) where they are arguments, as in the rest of the kit; the
`image_sizes` tensors the batches carry are (height, width) per image, as transformers'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from src.model.image_transform import select_best_resolution
from src.model.vision.config import ANYRES_MERGES

__all__ = ["ANYRES_MERGES", "AnyresLayout", "ImageNewline", "canvas_for", "grid_side", "merge_image", "unpadded_span"]


def canvas_for(width: int, height: int, size: int, grids: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """(cols, rows) of `size`-square crops of the canvas LLaVA-NeXT picks for a (width, height) image."""
    grid_w, grid_h = select_best_resolution((width, height), grids)
    return grid_w // size, grid_h // size


def unpadded_span(width: int, height: int, map_w: int, map_h: int) -> tuple[slice, slice]:
    """(row slice, column slice) of a (map_h, map_w) token map of a padded canvas that covers the image.

    transformers' `unpad_image` (and its processor's `_get_unpadded_features`), in its own float
    arithmetic, so the kept rows and columns agree with it to the token: the image was scaled to
    touch the canvas on its tighter side, and the other side's padding is cut equally from both ends.
    """
    if width / height > map_w / map_h:  # wider than the canvas: padding above and below
        new_h = int(round(height * (map_w / width), 7))
        padding = (map_h - new_h) // 2
        return slice(padding, map_h - padding), slice(0, map_w)
    new_w = int(round(width * (map_h / height), 7))
    padding = (map_w - new_w) // 2
    return slice(0, map_h), slice(padding, map_w - padding)


def _length(span: slice, total: int) -> int:
    return len(range(*span.indices(total)))


@dataclass(frozen=True)
class AnyresLayout:
    """What an anyres image's token count depends on; picklable, so loader workers count tokens with it."""

    size: int
    """Crop side in pixels (the tower's input size)."""
    grids: tuple[tuple[int, int], ...]
    """Candidate canvases (width, height) in pixels, multiples of `size`."""
    view_tokens: int
    """Tokens of one view after the projector (576 for CLIP-L/14 at 336 px and an MLP: 24 per side)."""
    merge: str = "unpad"
    """`unpad` or `flat`."""

    def __post_init__(self) -> None:
        if self.merge not in ANYRES_MERGES:
            raise ValueError(f"unknown anyres_merge {self.merge!r}; choose one of {list(ANYRES_MERGES)}")
        if self.merge == "unpad":
            grid_side(self.view_tokens, 0)

    @property
    def side(self) -> int:
        """Tokens per side of a view's square grid (unpad)."""
        return math.isqrt(self.view_tokens)

    def views_for(self, width: int, height: int) -> int:
        cols, rows = canvas_for(width, height, self.size, self.grids)
        return 1 + cols * rows

    def tokens_for(self, width: int, height: int) -> int:
        """Tokens of a (width, height) image: equal to transformers' `LlavaNextProcessor._get_number_of_features`
        (minus its CLS, which LLaVA's `patch` features drop) for `unpad`."""
        cols, rows = canvas_for(width, height, self.size, self.grids)
        base = self.view_tokens
        if self.merge == "flat":
            return base * (1 + cols * rows)
        map_w, map_h = cols * self.side, rows * self.side
        row_span, col_span = unpadded_span(width, height, map_w, map_h)
        kept_rows = _length(row_span, map_h)
        return base + kept_rows * (_length(col_span, map_w) + 1)  # + 1: the newline ending each row

    def __call__(self, width: int, height: int) -> int:
        return self.tokens_for(width, height)


def grid_side(num_tokens: int, prefix_tokens: int, projector_name: str = "the projector") -> int:
    """Tokens per side of a projector's square output grid; unpad needs one to lay crops side by side."""
    side = math.isqrt(num_tokens)
    if prefix_tokens or side * side != num_tokens:
        why = f"{prefix_tokens} CLS/register tokens before its grid" if prefix_tokens else "not a square"
        raise ValueError(
            f"anyres_merge unpad lays each crop's tokens out as a square grid, but {projector_name} makes "
            f"{num_tokens} tokens per view ({why}); use vision.anyres_merge: flat (every view's tokens in "
            "order), or a projector and feature_select that keep a square patch grid"
        )
    return side


def merge_image(
    features: torch.Tensor, width: int, height: int, cols: int, rows: int, side: int, newline: torch.Tensor
) -> torch.Tensor:
    """One image's views (1 + rows * cols, side * side, hidden) -> its tokens (n, hidden), `unpad`.

    The crops are row-major over the canvas and each crop's tokens row-major over the crop, so
    the canvas map puts crop (r, c)'s token (i, j) at (r * side + i, c * side + j).
    """
    hidden = features.shape[-1]
    base, crops = features[0], features[1:]
    canvas = (
        crops.reshape(rows, cols, side, side, hidden).permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, hidden)
    )
    row_span, col_span = unpadded_span(width, height, cols * side, rows * side)
    canvas = canvas[row_span, col_span]
    ends = newline.to(canvas.dtype).expand(canvas.shape[0], 1, hidden)
    return torch.cat([base, torch.cat([canvas, ends], dim=1).reshape(-1, hidden)])


class ImageNewline(nn.Module):
    """The learned embedding that ends each row of an unpadded anyres image, and the merge that uses it.

    A module of the projector (`projector.anyres.image_newline`), so it trains, freezes, is
    checkpointed and loaded (`init_from`) with the projector; a module of its own, so FSDP2
    can make it a unit (`shard_model`) that gathers its parameter when the merge runs.
    Initialised as LLaVA-NeXT and transformers do: normal with std 1 / sqrt(hidden).
    """

    def __init__(self, hidden: int, layout: AnyresLayout) -> None:
        super().__init__()
        if layout.merge != "unpad":
            raise ValueError(f"ImageNewline is the unpad merge's; the layout's merge is {layout.merge!r}")
        self.layout = layout
        self.image_newline = nn.Parameter(torch.randn(hidden) / math.sqrt(hidden))

    def forward(self, features: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """(views of all images, side * side, hidden) and (images, 2) (height, width) -> (tokens, hidden)."""
        layout = self.layout
        sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
        canvases = [canvas_for(w, h, layout.size, layout.grids) for h, w in sizes]
        views = [1 + cols * rows for cols, rows in canvases]
        if sum(views) != features.shape[0]:
            raise ValueError(
                f"image_sizes {sizes} make {sum(views)} anyres views but the batch has {features.shape[0]}: "
                "pixel_values and image_sizes must hold the same images in the same order"
            )
        merged, start = [], 0
        for (height, width), (cols, rows), n in zip(sizes, canvases, views, strict=True):
            merged.append(
                merge_image(features[start : start + n], width, height, cols, rows, layout.side, self.image_newline)
            )
            start += n
        return torch.cat(merged)
