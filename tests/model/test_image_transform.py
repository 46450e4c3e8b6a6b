"""src.model.vision.ImageTransform against the references, pixel for pixel: transformers' CLIP and
LLaVA-NeXT image processors (their PIL backends, `CLIPImageProcessorPil` and
`LlavaNextImageProcessorPil`: the ones LLaVA's pinned transformers ran; transformers 5's
`CLIPImageProcessor` is the torchvision backend, whose antialiased resize differs) and official
LLaVA's `expand2square` / `process_images` / `process_anyres_image`, loaded from the installed
llava-torch wheel. Normalised float tensors are compared with `torch.equal`: every bit.

Images are random noise (every pixel independent: the hardest case for a resampler) at a seeded
spread of sizes: portrait, landscape, square, 1-pixel lines, upscaled tiny ones, and photo sizes
at LLaVA-1.5's 336 px, where the short-side rounding once differed (640x427 -> 503 wide, not 504).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_processing_utils import get_patch_output_size
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.image_transforms import get_resize_output_image_size
from transformers.image_utils import ChannelDimension
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from src.model.vision import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageTransform,
    default_anyres_grids,
    resize_and_pad,
    select_best_resolution,
    shortest_edge_size,
)

mm_utils = pytest.importorskip("llava.mm_utils", reason="official LLaVA (llava-torch) is not installed")

SMALL = 24  # a crop size that keeps transformers' numpy path fast on dozens of sizes
PHOTO = 336  # LLaVA-1.5's


def random_sizes(count: int, low: int, high: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return [(int(w), int(h)) for w, h in rng.integers(low, high, (count, 2))]


# (width, height) at the SMALL crop size: edge cases, then random ones
SMALL_SIZES = [(24, 24), (25, 24), (24, 25), (1, 1), (1, 50), (50, 1), (7, 3), (3, 7), (97, 64), (64, 97)]
SMALL_SIZES += random_sizes(30, 1, 130, seed=21)
# at 336 px: photos (640x427 is where rounding gave 504 px and CLIP 503), odd and extreme ones
PHOTO_SIZES = [(640, 427), (427, 640), (500, 375), (336, 336), (337, 336), (1000, 667), (40, 700), (700, 40), (90, 60)]


def noise(size: tuple[int, int], seed: int) -> Image.Image:
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def shape_only(width: int, height: int) -> np.ndarray:
    """A (1, h, w) array for transformers' size helpers, which read only its shape: no memory."""
    return np.broadcast_to(np.zeros((1, 1, 1), dtype=np.uint8), (1, height, width))


def sized_cases(sizes: list[tuple[int, int]], crop: int) -> list:
    return [pytest.param(size, crop, id=f"{crop}-{size[0]}x{size[1]}") for size in sizes]


CASES = sized_cases(SMALL_SIZES, SMALL) + sized_cases(PHOTO_SIZES, PHOTO)


def clip_processor(crop: int) -> CLIPImageProcessorPil:
    """LLaVA-1.5's openai/clip-vit-large-patch14-336 preprocessor_config.json, at `crop` px."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": crop},
        crop_size={"height": crop, "width": crop},
        resample=3,  # bicubic
        do_center_crop=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_convert_rgb=True,
    )


def kit(crop: int, mode: str) -> ImageTransform:
    return ImageTransform(crop, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, mode=mode)


def assert_bit_equal(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.dtype == reference.dtype == torch.float32
    assert ours.shape == reference.shape
    if not torch.equal(ours, reference):
        worst = (ours - reference).abs().max().item()
        raise AssertionError(f"{(ours != reference).sum().item()} values differ, the largest by {worst}")


# ---- resize_crop: CLIP's image processor ---------------------------------------------------
def test_short_side_resize_truncates_as_transformers_does():
    """The output size alone, over thousands of sizes and three crop sizes: transformers'
    `get_resize_output_image_size(..., default_to_square=False)` gives (h, w)."""
    assert shortest_edge_size(640, 427, 336) == (503, 336)  # round() gave 504
    assert shortest_edge_size(427, 640, 336) == (336, 503)
    for crop in (24, 224, 336):
        for width, height in random_sizes(2000, 1, 5000, seed=crop) + [(1, 1), (1, 4999), (4999, 1)]:
            image = shape_only(width, height)
            hf_h, hf_w = get_resize_output_image_size(
                image, crop, default_to_square=False, input_data_format=ChannelDimension.FIRST
            )
            assert shortest_edge_size(width, height, crop) == (hf_w, hf_h), (width, height, crop)


@pytest.mark.parametrize(("size", "crop"), CASES)
def test_resize_crop_equals_clip_image_processor(size, crop):
    image = noise(size, seed=size[0] * 7919 + size[1])
    reference = torch.from_numpy(clip_processor(crop)(image, return_tensors="np")["pixel_values"])
    assert_bit_equal(kit(crop, "resize_crop")(image), reference)


@pytest.mark.parametrize("size", [(640, 427), (300, 1000), (50, 20)])
def test_resize_crop_equals_official_llava_without_pad(size):
    """LLaVA with `image_aspect_ratio` unset hands the image to the CLIP processor as it is."""

    class Config:
        image_aspect_ratio = None

    image = noise(size, seed=1)
    reference = mm_utils.process_images([image], clip_processor(SMALL), Config())
    assert_bit_equal(kit(SMALL, "resize_crop")(image), reference)


def test_resize_crop_draft_size_covers_the_resize():
    """A reduced JPEG decode must keep at least the pixels the resize makes: the draft hint is
    exactly the short-side resize, for every size."""
    transform = kit(PHOTO, "resize_crop")
    assert transform.draft_size(1024, 768) == (448, 336)
    assert transform.draft_size(640, 427) == (503, 336)
    for width, height in random_sizes(500, 1, 4000, seed=3):
        assert transform.draft_size(width, height) == shortest_edge_size(width, height, PHOTO)


# ---- pad: LLaVA-1.5's expand2square, then CLIP's processor ---------------------------------
@pytest.mark.parametrize(("size", "crop"), CASES)
def test_pad_equals_official_llava_process_images(size, crop):
    """`process_images` with `image_aspect_ratio: pad` (expand2square on the mean colour
    int(255 * mean), then the CLIP processor): also checks the kit's fast pad path."""

    class Config:
        image_aspect_ratio = "pad"

    image = noise(size, seed=size[0] * 31 + size[1])
    reference = mm_utils.process_images([image], clip_processor(crop), Config())
    assert_bit_equal(kit(crop, "pad")(image), reference)


def test_expand_to_square_equals_official_expand2square():
    from src.model.vision import expand_to_square

    fill = tuple(int(x * 255) for x in OPENAI_CLIP_MEAN)
    for size in SMALL_SIZES:
        image = noise(size, seed=5)
        assert expand_to_square(image, fill).tobytes() == mm_utils.expand2square(image, fill).tobytes()


# ---- anyres: transformers' LLaVA-NeXT image processor -------------------------------------
def pinpoints(transform: ImageTransform) -> list[list[int]]:
    """transformers reads `image_grid_pinpoints` as [height, width]; the kit's grids are (w, h)."""
    return [[height, width] for width, height in transform.grids]


def llava_next_processor(transform: ImageTransform) -> LlavaNextImageProcessorPil:
    crop = transform.size
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": crop},
        crop_size={"height": crop, "width": crop},
        image_grid_pinpoints=pinpoints(transform),
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )


@pytest.mark.parametrize(("size", "crop"), CASES)
def test_anyres_views_equal_llava_next_image_processor(size, crop):
    """The base view, then every crop of the canvas in row-major order, each bit for bit."""
    transform = kit(crop, "anyres")
    image = noise(size, seed=size[0] * 131 + size[1])
    out = llava_next_processor(transform)(image, return_tensors="np")
    assert out["image_sizes"].tolist() == [[size[1], size[0]]]
    reference = torch.from_numpy(out["pixel_values"][0])
    ours = transform(image)
    assert len(ours) == transform.views_for(*size)
    assert_bit_equal(ours, reference)


@pytest.mark.parametrize("size", [(100, 40), (50, 70), (130, 130), (20, 90)])
def test_anyres_equals_official_llava_when_both_read_the_grids_as_width_height(size):
    """Official LLaVA's `process_anyres_image` reads pinpoints as (w, h), like the kit; given the
    kit's grids it makes the same views. (Given LLaVA-NeXT's released list, read as (w, h), it
    prefers a tall canvas on ties where the kit, like transformers, prefers a wide one.)"""
    transform = kit(SMALL, "anyres")
    image = noise(size, seed=9)
    reference = mm_utils.process_anyres_image(image, clip_processor(SMALL), [list(g) for g in transform.grids])
    assert_bit_equal(transform(image), reference)


def test_select_best_resolution_equals_transformers():
    """Over many sizes, for the kit's default grids and for transformers' own default list (the
    same canvases in another order: the two 3-crop canvases are swapped, which never decides)."""
    hf_default = LlavaNextImageProcessorPil.image_grid_pinpoints  # [h, w], for a 336 px crop
    grids = default_anyres_grids(PHOTO)
    assert sorted(grids) == sorted((w, h) for h, w in hf_default)
    sizes = random_sizes(3000, 1, 3000, seed=7) + [(w, h) for w in range(1, 700, 23) for h in range(1, 700, 29)]
    for width, height in sizes:
        chosen = select_best_resolution((width, height), grids)
        hf_h, hf_w = hf_select_best_resolution((height, width), [[h, w] for w, h in grids])
        assert chosen == (hf_w, hf_h), (width, height)
        hf_h, hf_w = hf_select_best_resolution((height, width), hf_default)
        assert chosen == (hf_w, hf_h), (width, height)


def test_resize_and_pad_places_the_image_as_get_patch_output_size_says():
    """The size the image is scaled to inside its canvas and where it sits: transformers'
    `get_patch_output_size`, and `_get_padding_size` (the odd pixel of padding after)."""
    grids = default_anyres_grids(SMALL)
    for width, height in random_sizes(400, 1, 400, seed=11):
        canvas = select_best_resolution((width, height), grids)
        image = shape_only(width, height)
        hf_h, hf_w = get_patch_output_size(image, canvas[::-1], input_data_format=ChannelDimension.FIRST)
        padded = resize_and_pad(Image.new("RGB", (width, height), (255, 255, 255)), canvas, (0, 0, 0))
        assert padded.size == canvas
        left, top = (canvas[0] - hf_w) // 2, (canvas[1] - hf_h) // 2
        assert padded.convert("L").getbbox() == (left, top, left + hf_w, top + hf_h), (width, height)
