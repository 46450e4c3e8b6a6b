"""src.model.vision: a timm ViT cut at a chosen block, and its image transform."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from PIL import Image

from src.model.vision import ImageTransform, TimmVisionTower, VisionConfig, build_vision_tower

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(patch_size=16, embed_dim=32, depth=3, num_heads=2)


def tiny_config(**options) -> VisionConfig:
    return VisionConfig(**({"name": "vit_tiny_patch16_224", "image_size": 64, "kwargs": dict(TINY)} | options))


def reference_blocks(tower: TimmVisionTower, pixels: torch.Tensor, blocks: int) -> torch.Tensor:
    """An unpruned timm model with the tower's weights, run by hand through `blocks` blocks."""
    reference = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=64, **TINY).eval()
    result = reference.load_state_dict(tower.model.state_dict(), strict=False)
    assert result.unexpected_keys == []
    # what the tower dropped: the blocks after the feature layer and the final norm
    dropped = {
        k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("blocks.") else "") for k in result.missing_keys
    }
    assert dropped == {f"blocks.{i}" for i in range(blocks, 3)} | {"norm"}
    x = reference.norm_pre(reference.patch_drop(reference._pos_embed(reference.patch_embed(pixels))))
    for block in reference.blocks[:blocks]:
        x = block(x)
    return x


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_patch_features_shape(pixels):
    torch.manual_seed(0)
    tower = build_vision_tower(tiny_config())
    assert isinstance(tower, TimmVisionTower)
    assert tower.grid == (4, 4) and tower.num_tokens == 16 and tower.hidden_size == 32
    with torch.no_grad():
        assert tower.eval()(pixels).shape == (2, 16, 32)


@pytest.mark.parametrize(("feature_layer", "blocks"), [(-2, 2), (-1, 3), (0, 1), (1, 2), (-3, 1)])
def test_features_equal_the_unpruned_model_block_output(pixels, feature_layer, blocks):
    torch.manual_seed(0)
    tower = TimmVisionTower(tiny_config(feature_layer=feature_layer)).eval()
    assert tower.layer == blocks - 1
    assert len(tower.model.blocks) == blocks  # later blocks are pruned away
    with torch.no_grad():
        features = tower(pixels)
        expected = reference_blocks(tower, pixels, blocks)
    assert expected.shape == (2, 17, 32)
    assert torch.allclose(features, expected[:, 1:], atol=1e-6)


def test_cls_patch_keeps_the_cls_token_first(pixels):
    torch.manual_seed(0)
    tower = TimmVisionTower(tiny_config(feature_select="cls_patch")).eval()
    assert tower.num_tokens == 17
    with torch.no_grad():
        features = tower(pixels)
        expected = reference_blocks(tower, pixels, 2)
    assert features.shape == (2, 17, 32)
    assert torch.allclose(features, expected, atol=1e-6)


def test_features_do_not_depend_on_batch_neighbours(pixels):
    torch.manual_seed(0)
    tower = TimmVisionTower(tiny_config()).eval()
    with torch.no_grad():
        assert torch.allclose(tower(pixels)[1:], tower(pixels[1:]), atol=1e-6)


@pytest.mark.parametrize("feature_layer", [3, 7, -4])
def test_feature_layer_outside_the_tower(feature_layer):
    with pytest.raises(ValueError, match=re.escape(f"feature_layer {feature_layer} is outside a 3-block tower")):
        TimmVisionTower(tiny_config(feature_layer=feature_layer))


def test_unknown_timm_model():
    with pytest.raises(
        ValueError, match=re.escape("unknown timm model 'vit_nonexistent_patch16'; see timm.list_models()")
    ):
        TimmVisionTower(VisionConfig(name="vit_nonexistent_patch16"))


def test_unknown_feature_select():
    with pytest.raises(
        ValueError, match=re.escape("unknown feature_select 'cls'; choose one of ['patch', 'cls_patch']")
    ):
        TimmVisionTower(tiny_config(feature_select="cls"))


def test_image_transform_of_the_tower():
    tower = TimmVisionTower(tiny_config())
    transform = tower.image_transform()
    assert transform == ImageTransform(size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def test_image_transform_resizes_and_normalises():
    transform = ImageTransform(size=32, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    out = transform(Image.new("RGB", (50, 20), (255, 0, 102)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], torch.full((32, 32), 1.0))
    torch.testing.assert_close(out[1], torch.full((32, 32), -1.0))
    torch.testing.assert_close(out[2], torch.full((32, 32), (102 / 255) / 2.0))
    grey = transform(Image.new("L", (8, 8), 51))  # grey input becomes 3 channels
    torch.testing.assert_close(grey[:, 0, 0], torch.tensor([(0.2 - 0.5) / 0.5, (0.2 - 0.25) / 0.25, 0.1]))


def test_image_transform_matches_a_numpy_reference():
    import numpy as np

    image = Image.effect_noise((40, 40), 50).convert("RGB")
    transform = ImageTransform(size=24, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    resized = np.asarray(image.resize((24, 24), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    expected = (resized - np.array([0.4, 0.5, 0.6], dtype=np.float32)) / np.array([0.2, 0.3, 0.4], dtype=np.float32)
    torch.testing.assert_close(transform(image), torch.from_numpy(expected).permute(2, 0, 1))
