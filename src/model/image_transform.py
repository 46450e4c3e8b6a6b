"""The image transform: PIL image -> normalised pixel views, the part of a tower that runs in
data-loader workers. It imports neither timm nor transformers, so a worker (and the data layer,
which is handed a transform as a value) loads no model code.

The modes follow the references pixel for pixel: LLaVA-1.5's `expand2square` pad, CLIP's
shortest-edge resize and centre crop (transformers' image processor), LLaVA-NeXT's anyres
canvases (`select_best_resolution`, black padding, crops)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGE_MODES = ("resize", "resize_crop", "pad", "anyres")

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


def default_anyres_grids(size: int) -> tuple[tuple[int, int], ...]:
    """LLaVA-NeXT's resolutions for a crop size s: 2x1, 1x2, 2x2, 3x1, 1x3 crops, as (w, h) pixels."""
    return ((2 * size, size), (size, 2 * size), (2 * size, 2 * size), (3 * size, size), (size, 3 * size))


def select_best_resolution(image_size: tuple[int, int], grids: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """LLaVA-NeXT's choice of canvas (w, h) for an image (w, h): the most image pixels kept
    after a fitting downscale (never counting upscaling as gain), ties to the least padding."""
    width, height = image_size
    best, best_effective, best_wasted = grids[0], -1, math.inf
    for grid_w, grid_h in grids:
        scale = min(grid_w / width, grid_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = grid_w * grid_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (grid_w, grid_h), effective, wasted
    return best


def resize_and_pad(image: Image.Image, target: tuple[int, int], fill: tuple[int, int, int]) -> Image.Image:
    """Fits the image inside `target` (w, h) keeping its aspect ratio, centred on a `fill` canvas."""
    width, height = image.size
    target_w, target_h = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(height * scale_w), target_h)
    else:
        new_w, new_h = min(math.ceil(width * scale_h), target_w), target_h
    canvas = Image.new("RGB", target, fill)
    canvas.paste(
        image.resize((new_w, new_h), Image.Resampling.BICUBIC), ((target_w - new_w) // 2, (target_h - new_h) // 2)
    )
    return canvas


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's expand2square: the image centred on a square canvas of its longer side."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def shortest_edge_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) with the shorter side at `size`, as CLIP's image processor resizes (transformers'
    `get_resize_output_image_size`): the longer side truncated, `int(size * long / short)`, not
    rounded, so a 640x427 photo becomes 503x336 (rounding gives 504) and every pixel matches."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def _check_grids(grids: tuple[tuple[int, int], ...], size: int) -> None:
    for grid in grids:
        if len(grid) != 2 or any(side <= 0 or side % size for side in grid):
            suggestion = [max(size, round(side / size) * size) for side in grid]
            raise ValueError(
                f"anyres_grids entry {list(grid)} is not a [width, height] of multiples of the crop size {size}; "
                f"use e.g. {suggestion}"
            )


@dataclass
class ImageTransform:
    """PIL image -> (views, 3, size, size) normalised pixels; a picklable dataclass, run in loader workers.

    `mode`: `resize` squashes the image to a square; `resize_crop` scales the shorter side to
    `size` and takes the centre square; `pad` centres it on a square of the `fill` colour
    first (LLaVA-1.5); `anyres` (LLaVA-NeXT) adds to one downscaled global view the
    `size`-square crops of the best of `grids` (w, h). Every mode gives one view but anyres.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mode: str = "resize"
    grids: tuple[tuple[int, int], ...] = ()
    """anyres canvases (width, height) in pixels, multiples of `size`; empty: `default_anyres_grids`."""
    fill: tuple[int, int, int] | None = None
    """`pad` colour; None: the mean colour, int(255 * mean), which normalises to zero."""

    def __post_init__(self) -> None:
        if self.mode not in IMAGE_MODES:
            raise ValueError(f"unknown image_mode {self.mode!r}; choose one of {list(IMAGE_MODES)}")
        self.size = int(self.size)
        self.mean = tuple(float(x) for x in self.mean)
        self.std = tuple(float(x) for x in self.std)
        if self.fill is not None:
            self.fill = tuple(int(x) for x in self.fill)
        grids = tuple(tuple(int(side) for side in grid) for grid in self.grids)
        if self.mode == "anyres":
            grids = grids or default_anyres_grids(self.size)
            _check_grids(grids, self.size)
        self.grids = grids

    @property
    def fill_colour(self) -> tuple[int, int, int]:
        return self.fill if self.fill is not None else tuple(int(255 * m) for m in self.mean)

    def views_for(self, width: int, height: int) -> int:
        """How many views an image of this size becomes: 1, or for anyres 1 + its crops."""
        if self.mode != "anyres":
            return 1
        grid_w, grid_h = select_best_resolution((width, height), self.grids)
        return 1 + (grid_w // self.size) * (grid_h // self.size)

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        """The smallest (width, height) an image stored at this size may be decoded at: the size
        the image itself is resampled to, so a reduced decode (`decode_image(..., draft=...)`)
        never leaves fewer pixels than the views take. None for anyres, whose choice of canvas
        depends on the stored size."""
        size = self.size
        if self.mode == "resize":
            return size, size
        if self.mode == "resize_crop":
            return shortest_edge_size(width, height, size)
        if self.mode != "pad":
            return None
        scale = size / max(width, height)
        return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))

    def _pad_and_resize(self, image: Image.Image) -> Image.Image:
        """`expand_to_square(image, fill).resize((size, size), BICUBIC)`, pixel for pixel, with less work.

        Pillow resamples horizontally first, then vertically, through an 8-bit intermediate,
        and its fixed-point weights turn a constant row into the same constant. So for a wide
        image the intermediate of the padded square is the image's rows resampled on their
        own with fill rows above and below: the fill rows' horizontal pass (a quarter of a 4:3
        photo's canvas) and the full-size canvas are skipped. Every row of a tall image's
        canvas holds image pixels, so it takes the plain path.
        """
        size, fill = self.size, self.fill_colour
        width, height = image.size
        if width <= height:
            return expand_to_square(image, fill).resize((size, size), Image.Resampling.BICUBIC)
        strip = image.resize((size, height), Image.Resampling.BICUBIC)  # the horizontal pass alone
        tall = Image.new("RGB", (size, width), fill)
        tall.paste(strip, (0, (width - height) // 2))
        return tall.resize((size, size), Image.Resampling.BICUBIC)  # the vertical pass alone

    def views(self, image: Image.Image) -> list[Image.Image]:
        """The PIL views before normalisation."""
        if image.mode != "RGB":
            image = image.convert("RGB")  # convert() copies even an RGB image
        size = self.size
        if self.mode == "resize":
            return [image.resize((size, size), Image.Resampling.BICUBIC)]
        if self.mode == "pad":
            return [self._pad_and_resize(image)]
        if self.mode == "resize_crop":
            width, height = shortest_edge_size(*image.size, size)
            image = image.resize((width, height), Image.Resampling.BICUBIC)
            left, top = (width - size) // 2, (height - size) // 2
            return [image.crop((left, top, left + size, top + size))]
        # anyres pads with black, as LLaVA-NeXT and transformers' LlavaNext processor do
        canvas = resize_and_pad(image, select_best_resolution(image.size, self.grids), (0, 0, 0))
        crops = [
            canvas.crop((left, top, left + size, top + size))
            for top in range(0, canvas.height, size)
            for left in range(0, canvas.width, size)
        ]
        return [image.resize((size, size), Image.Resampling.BICUBIC), *crops]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        views = self.views(image)
        width, height = views[0].size
        out = torch.empty(len(views), 3, height, width)
        for index, view in enumerate(views):
            for channel, plane in enumerate(view.split()):  # planar uint8, written straight into place
                out[index, channel].copy_(torch.from_numpy(np.array(plane)))
        # the same float32 operations, in the same order, as (x / 255 - mean) / std: equal bits
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return out.div_(255.0).sub_(mean).div_(std)
