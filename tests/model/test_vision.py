"""src.model.vision: timm / transformers / fused towers cut at a layer, and the image transforms."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from tiny_models import tiny_hf_vision_configs
from transformers import AutoConfig, AutoModel, CLIPConfig, CLIPModel, CLIPVisionModel
from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

from src.model.vision import (
    VISION_TOWERS,
    FusedVisionTower,
    HFVisionTower,
    ImageTransform,
    TimmVisionTower,
    VisionConfig,
    build_vision_tower,
    check_timm_activation,
    default_anyres_grids,
    select_best_resolution,
)

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(patch_size=16, embed_dim=32, depth=3, num_heads=2)
TINY_CONVNEXT = dict(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1))
HF_CONFIGS = tiny_hf_vision_configs(width=32, intermediate=64)  # 32 px images in 8 px patches: 4x4
PREFIX_TOKENS = {"clip": 1, "siglip": 0, "siglip2": 0, "dinov2": 1, "dinov2_registers": 3}


def tiny_config(**options) -> VisionConfig:
    return VisionConfig(**({"name": "vit_tiny_patch16_224", "image_size": 64, "kwargs": dict(TINY)} | options))


def hf_config(family: str, **options) -> VisionConfig:
    return VisionConfig(**({"type": "hf", "config": dict(HF_CONFIGS[family])} | options))


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


def unpruned_hf(tower: HFVisionTower, family: str) -> torch.nn.Module:
    """transformers' own model at full depth, holding the tower's weights (the rest random)."""
    values = dict(HF_CONFIGS[family])
    reference = AutoModel.from_config(AutoConfig.for_model(values.pop("model_type"), **values)).eval()
    result = reference.load_state_dict(tower.model.state_dict(), strict=False)
    assert result.unexpected_keys == []
    layers = tower.family.layers
    assert {k.split(".")[2] for k in result.missing_keys} == {str(i) for i in range(tower.layer + 1, 3)}
    assert all(k.startswith(layers + ".") for k in result.missing_keys)
    return reference


def hf_hidden_states(reference: torch.nn.Module, family: str, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if family == "siglip2":  # patches made by transformers' own SigLIP2 processor function
        patches = torch.stack([convert_image_to_patches(image, 8) for image in pixels])
        n, length = patches.shape[:2]
        out = reference(
            pixel_values=patches,
            pixel_attention_mask=torch.ones(n, length, dtype=torch.long),
            spatial_shapes=torch.tensor([[4, 4]] * n),
            output_hidden_states=True,
        )
    else:
        out = reference(pixel_values=pixels, output_hidden_states=True)
    return out.hidden_states


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def small_pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ---- timm ViT -----------------------------------------------------------------------------
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
    assert tower.layer == blocks - 1 and tower.full_depth == 3
    assert len(tower.model.blocks) == blocks  # later blocks are pruned away
    assert tower.wrap_modules() == list(tower.model.blocks)
    with torch.no_grad():
        features = tower(pixels)
        expected = reference_blocks(tower, pixels, blocks)
    assert expected.shape == (2, 17, 32)
    assert torch.allclose(features, expected[:, 1:], atol=1e-6)


def test_cls_patch_keeps_the_cls_token_first(pixels):
    torch.manual_seed(0)
    tower = TimmVisionTower(tiny_config(feature_select="cls_patch")).eval()
    assert tower.num_tokens == 17 and tower.num_prefix_tokens == 1
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
    message = (
        f"feature_layer {feature_layer} is outside a 3-block tower; choose -3..2 (negative counts from the last block)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
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


def test_cls_patch_on_a_timm_model_without_prefix_tokens():
    config = tiny_config(feature_select="cls_patch", kwargs=TINY | {"class_token": False, "global_pool": "avg"})
    message = "feature_select cls_patch keeps prefix tokens but timm model 'vit_tiny_patch16_224' has none; use patch"
    with pytest.raises(ValueError, match=re.escape(message)):
        build_vision_tower(config)
    assert build_vision_tower(tiny_config(kwargs=TINY | {"class_token": False, "global_pool": "avg"})).num_tokens == 16


def test_image_smaller_than_a_patch():
    with pytest.raises(ValueError, match=re.escape("image_size 8 is smaller than one 16-pixel patch; use at least 16")):
        build_vision_tower(tiny_config(image_size=8))


def test_the_demo_config_still_builds():
    vision = yaml.safe_load((ROOT / "lightning_config.yaml").read_text())["model"]["vision"]
    tower = build_vision_tower(VisionConfig(**vision))
    assert isinstance(tower, TimmVisionTower)
    assert (tower.grid, tower.hidden_size, tower.num_tokens, tower.layer) == ((2, 2), 128, 4, 2)
    assert tower.image_transform() == ImageTransform(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_image_transform_of_the_tower():
    tower = TimmVisionTower(tiny_config())
    transform = tower.image_transform()
    assert transform == ImageTransform(size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    custom = TimmVisionTower(tiny_config(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), image_mode="pad"))
    assert custom.image_transform() == ImageTransform(64, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), mode="pad")


# ---- timm ConvNeXt ------------------------------------------------------------------------
def convnext_config(**options) -> VisionConfig:
    return VisionConfig(**({"name": "convnext_atto", "image_size": 64, "kwargs": dict(TINY_CONVNEXT)} | options))


@pytest.mark.parametrize(("feature_layer", "stage", "grid", "hidden"), [(-1, 3, (2, 2), 32), (-2, 2, (4, 4), 24)])
def test_convnext_reads_a_stage_feature_map(pixels, feature_layer, stage, grid, hidden):
    torch.manual_seed(0)
    tower = build_vision_tower(convnext_config(feature_layer=feature_layer)).eval()
    assert (tower.layer, tower.full_depth, tower.grid, tower.hidden_size) == (stage, 4, grid, hidden)
    assert tower.num_prefix_tokens == 0 and tower.num_tokens == grid[0] * grid[1]
    assert tower.wrap_modules() == list(tower.model.stages) and len(tower.model.stages) == stage + 1
    reference = timm.create_model("convnext_atto", num_classes=0, **TINY_CONVNEXT).eval()
    assert reference.load_state_dict(tower.model.state_dict(), strict=False).unexpected_keys == []
    with torch.no_grad():
        features = tower(pixels)
        x = reference.stem(pixels)
        for block in reference.stages[: stage + 1]:
            x = block(x)
    assert features.shape == (2, tower.num_tokens, hidden)
    torch.testing.assert_close(features, x.flatten(2).transpose(1, 2))  # row-major grid, channels last


def test_convnext_errors():
    with pytest.raises(ValueError, match=re.escape("feature_layer 4 is outside a 4-stage tower; choose -4..3")):
        build_vision_tower(convnext_config(feature_layer=4))
    with pytest.raises(
        ValueError,
        match=re.escape("image_size 70 is not a multiple of the 32-pixel stride of stage 3; use e.g. 64 or 96"),
    ):
        build_vision_tower(convnext_config(feature_layer=-1, image_size=70))
    with pytest.raises(ValueError, match=re.escape("timm model 'convnext_atto' has none; use patch")):
        build_vision_tower(convnext_config(feature_select="cls_patch"))


# ---- transformers towers ------------------------------------------------------------------
@pytest.mark.parametrize("family", list(HF_CONFIGS))
@pytest.mark.parametrize("feature_select", ["patch", "cls_patch"])
def test_hf_features_equal_transformers_hidden_states(small_pixels, family, feature_select):
    torch.manual_seed(0)
    prefix = PREFIX_TOKENS[family]
    if feature_select == "cls_patch" and prefix == 0:
        with pytest.raises(ValueError, match="cls_patch keeps prefix tokens but .* has none; use patch"):
            build_vision_tower(hf_config(family, feature_select=feature_select))
        return
    tower = build_vision_tower(hf_config(family, feature_select=feature_select)).eval()
    assert isinstance(tower, HFVisionTower) and type(tower.model).__name__ == tower.family.model_class
    kept = prefix if feature_select == "cls_patch" else 0
    assert (tower.grid, tower.hidden_size, tower.num_prefix_tokens, tower.num_tokens) == ((4, 4), 32, kept, 16 + kept)
    assert (tower.layer, tower.full_depth, tower.model.config.num_hidden_layers) == (1, 3, 2)
    assert tower.wrap_modules() == list(tower.model.get_submodule(tower.family.layers))
    assert len(tower.wrap_modules()) == 2  # the third layer is gone
    reference = unpruned_hf(tower, family)
    with torch.no_grad():
        features = tower(small_pixels)
        hidden_states = hf_hidden_states(reference, family, small_pixels)
        embedded = tower.embed(small_pixels)
    assert len(hidden_states) == 4  # the embeddings output, then one per layer
    torch.testing.assert_close(embedded, hidden_states[0])
    assert features.shape == (2, tower.num_tokens, 32)
    # feature_layer -2 reads LLaVA's hidden_states[-2], the output of block 1 = hidden_states[1 + 1]
    torch.testing.assert_close(features, hidden_states[-2][:, prefix - kept :], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features, hidden_states[tower.layer + 1][:, prefix - kept :], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("feature_layer", "layer"), [(-1, 2), (0, 0), (-3, 0), (2, 2)])
def test_hf_feature_layer_counts_blocks(small_pixels, feature_layer, layer):
    torch.manual_seed(0)
    tower = build_vision_tower(hf_config("clip", feature_layer=feature_layer)).eval()
    assert tower.layer == layer and len(tower.model.encoder.layers) == layer + 1
    with torch.no_grad():
        expected = hf_hidden_states(unpruned_hf(tower, "clip"), "clip", small_pixels)[layer + 1][:, 1:]
        torch.testing.assert_close(tower(small_pixels), expected, atol=1e-5, rtol=1e-5)


def test_hf_pruned_weights_load_into_transformers_own_class():
    torch.manual_seed(0)
    tower = build_vision_tower(hf_config("siglip"))
    names = set(tower.model.state_dict())
    assert any(n.startswith("post_layernorm.") for n in names) and any(n.startswith("head.") for n in names)
    fresh = type(tower.model)(tower.model.config)  # num_hidden_layers is the kept depth
    fresh.load_state_dict(tower.model.state_dict(), strict=True)


def test_hf_image_size_other_than_native_interpolates_positions():
    torch.manual_seed(0)
    tower = build_vision_tower(hf_config("clip", image_size=48, feature_select="cls_patch")).eval()
    assert tower.grid == (6, 6) and tower.num_tokens == 37 and tower.image_transform().size == 48
    pixels = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden = unpruned_hf(tower, "clip")(pixels, interpolate_pos_encoding=True, output_hidden_states=True)
        torch.testing.assert_close(tower(pixels), hidden.hidden_states[2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("family", "mean", "std"),
    [
        ("clip", (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ("siglip", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ("siglip2", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ("dinov2", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ],
)
def test_hf_default_normalisation_per_model_type(family, mean, std):
    assert build_vision_tower(hf_config(family)).image_transform() == ImageTransform(32, mean, std)
    override = build_vision_tower(hf_config(family, mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0)))
    assert override.image_transform() == ImageTransform(32, (0.1, 0.2, 0.3), (1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> tuple[Path, CLIPModel]:
    """A whole CLIP checkpoint (vision + text) with its preprocessor, as a hub repo holds it."""
    torch.manual_seed(0)
    vision = {k: v for k, v in HF_CONFIGS["clip"].items() if k != "model_type"}
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    model = CLIPModel(CLIPConfig(vision_config=vision, text_config=text))
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_center_crop": True,
        "crop_size": {"height": 32, "width": 32},
        "size": {"shortest_edge": 40},
        "image_mean": [0.25, 0.5, 0.75],
        "image_std": [0.1, 0.2, 0.3],
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder, model


def test_hf_tower_by_name_loads_the_vision_half_and_the_preprocessor(clip_folder, small_pixels):
    folder, clip = clip_folder
    tower = build_vision_tower(VisionConfig(type="hf", name=str(folder))).eval()
    assert isinstance(tower.model, CLIPVisionModel) and tower.layer == 1
    assert tower.image_transform() == ImageTransform(32, (0.25, 0.5, 0.75), (0.1, 0.2, 0.3))
    for key, value in tower.model.state_dict().items():
        torch.testing.assert_close(value, clip.vision_model.state_dict()[key])
    with torch.no_grad():
        expected = clip.vision_model(small_pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(tower(small_pixels), expected, atol=1e-5, rtol=1e-5)
    random = build_vision_tower(VisionConfig(type="hf", name=str(folder), pretrained=False))
    weight = random.model.embeddings.patch_embedding.weight
    assert weight.shape == clip.vision_model.embeddings.patch_embedding.weight.shape
    assert not torch.equal(weight, clip.vision_model.embeddings.patch_embedding.weight)
    assert random.image_transform() == tower.image_transform()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"config": {"model_type": "clip_vision_model", "hidden_sise": 8}},
         "vision.config has keys that clip_vision_model configs do not know: ['hidden_sise']"),
        ({"config": {"hidden_size": 8}}, "vision.config needs a model_type, one of ['clip_vision_model', "),
        ({"config": {"model_type": "vit"}}, "vision.config needs a model_type, one of ['clip_vision_model', "),
        ({}, "vision type hf needs exactly one of name (hub id or folder) and config (inline)"),
        ({"name": "x", "config": {"model_type": "dinov2"}}, "vision type hf needs exactly one of name"),
        ({"config": {"model_type": "dinov2"}, "pretrained": True}, "vision.pretrained needs a name (hub id or folder)"),
        ({"config": HF_CONFIGS["clip"], "image_size": 4}, "image_size 4 is smaller than one 8-pixel patch"),
        ({"config": HF_CONFIGS["siglip2"], "image_size": 36},
         "image_size 36 is not a multiple of the 8-pixel patch; use e.g. 32 or 40"),
        ({"config": HF_CONFIGS["dinov2"], "feature_layer": -5},
         "feature_layer -5 is outside a 3-layer tower; choose -3..2 (negative counts from the last layer)"),
        ({"config": HF_CONFIGS["dinov2"], "towers": [{}]}, "vision: type 'hf' does not use ['towers']"),
    ],
)  # fmt: skip
def test_hf_construction_errors(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_vision_tower(VisionConfig(type="hf", **options))


def test_hf_inline_config_values_from_the_command_line_are_typed():
    tower = build_vision_tower(hf_config("dinov2", config=HF_CONFIGS["dinov2"] | {"num_hidden_layers": "4"}))
    assert tower.full_depth == 4 and tower.layer == 2


def frozen_then_trained(tower, pixels: torch.Tensor) -> None:
    """Frozen: no parameter trains and no graph is kept. Trained: every parameter that runs gets
    a gradient, and those that never run (post norms, heads, mask tokens) stay frozen."""
    tower.requires_grad_(False)
    assert not any(p.requires_grad for p in tower.parameters())
    with torch.no_grad():
        assert tower(pixels).grad_fn is None
    tower.requires_grad_(True)
    tower(pixels).square().mean().backward()
    unused = {id(p) for p in tower.unused_parameters()}
    for name, param in tower.named_parameters():
        if id(param) in unused:
            assert not param.requires_grad and param.grad is None, name
        else:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", list(HF_CONFIGS))
def test_hf_frozen_forward_and_training_backward(small_pixels, family):
    torch.manual_seed(0)
    tower = build_vision_tower(hf_config(family))
    assert tower.unused_parameters()  # the post layernorm (and heads, mask tokens) are kept but never run
    frozen_then_trained(tower, small_pixels)


@pytest.mark.parametrize("config", [tiny_config(), tiny_config(feature_select="cls_patch"), convnext_config()])
def test_timm_frozen_forward_and_training_backward(pixels, config):
    torch.manual_seed(0)
    tower = build_vision_tower(config)
    assert tower.unused_parameters() == []  # timm prunes the norm and head away
    frozen_then_trained(tower, pixels)


# ---- fused --------------------------------------------------------------------------------
DINO_TOWER = {"type": "hf", "config": HF_CONFIGS["dinov2"]}  # 32 px in 8 px patches: 4x4
SIGLIP_TOWER = {"type": "hf", "config": dict(HF_CONFIGS["siglip"], hidden_size=24, patch_size=4, image_size=16)}


def fused_config(**options) -> VisionConfig:
    return VisionConfig(**({"type": "fused", "towers": [DINO_TOWER, SIGLIP_TOWER]} | options))


def test_fused_tower_concatenates_each_towers_own_features(small_pixels):
    torch.manual_seed(0)
    tower = build_vision_tower(fused_config()).eval()
    assert isinstance(tower, FusedVisionTower)
    assert (tower.grid, tower.hidden_size, tower.num_prefix_tokens, tower.num_tokens) == ((4, 4), 56, 0, 16)
    dino, siglip = tower.towers
    assert tower.wrap_modules() == dino.wrap_modules() + siglip.wrap_modules()
    # [0, 1] pixels in; the pad colour is the first tower's mean colour
    assert tower.image_transform() == ImageTransform(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), fill=(123, 116, 103))
    unit = small_pixels.sigmoid()
    imagenet = (
        torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
    )
    smaller = F.interpolate(unit, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    with torch.no_grad():
        features = tower(unit)
        expected = torch.cat([dino((unit - imagenet[0]) / imagenet[1]), siglip((smaller - 0.5) / 0.5)], dim=-1)
    assert features.shape == (2, 16, 56)
    torch.testing.assert_close(features, expected)


def test_fused_transform_feeds_the_fused_forward():
    torch.manual_seed(0)
    tower = build_vision_tower(fused_config(image_mode="pad")).eval()
    pixels = tower.image_transform()(Image.new("RGB", (48, 24), (255, 0, 0)))
    assert pixels.shape == (1, 3, 32, 32) and 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
    with torch.no_grad():
        assert tower(pixels).shape == (1, 16, 56)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"towers": [DINO_TOWER, SIGLIP_TOWER | {"image_size": 24}]},
         "fused towers make different token grids: towers[0] (4, 4) at 32 px and towers[1] (6, 6) at 24 px; "
         "set towers[1].image_size 16 (4 patches of 4 px) or towers[0].image_size 48"),
        ({"feature_select": "cls_patch"}, "a fused tower concatenates patch grids only; set feature_select: patch"),
        ({"towers": [DINO_TOWER | {"feature_select": "cls_patch"}, SIGLIP_TOWER]},
         "vision.towers[0]: a fused tower concatenates patch grids only; set feature_select: patch"),
        ({"towers": [DINO_TOWER, SIGLIP_TOWER | {"image_mode": "pad"}]},
         "vision.towers[1]: set ['image_mode'] on the fused config, which makes the pixels of all towers"),
        ({"towers": [DINO_TOWER]}, "vision type fused needs at least two towers, got 1"),
        ({"towers": [DINO_TOWER, {"type": "fused"}]}, "vision.towers[1]: a fused tower's towers cannot be fused"),
        ({"towers": [DINO_TOWER, SIGLIP_TOWER | {"colour": 1}]}, "vision.towers[1]: "),
        ({"name": "x", "feature_layer": -1}, "vision: type 'fused' does not use ['name', 'feature_layer']; set them on its towers"),
    ],
)  # fmt: skip
def test_fused_construction_errors(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_vision_tower(fused_config(**options))


def test_fused_frozen_forward_and_training_backward(small_pixels):
    torch.manual_seed(0)
    frozen_then_trained(build_vision_tower(fused_config()), small_pixels.sigmoid())


# ---- QuickGELU weights in GELU blocks -------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "variant"),
    [
        ("vit_large_patch14_clip_336.openai", "vit_large_patch14_clip_quickgelu_336.openai"),  # LLaVA-1.5's CLIP
        ("vit_large_patch14_clip_224.openai", "vit_large_patch14_clip_quickgelu_224.openai"),
        ("vit_base_patch16_clip_224.openai", "vit_base_patch16_clip_quickgelu_224.openai"),
        ("vit_base_patch32_clip_224.openai", "vit_base_patch32_clip_quickgelu_224.openai"),
        ("vit_base_patch16_clip_224.metaclip_400m", "vit_base_patch16_clip_quickgelu_224.metaclip_400m"),
        ("vit_huge_patch14_clip_224.dfn5b", "vit_huge_patch14_clip_quickgelu_224.dfn5b"),
    ],
)
def test_quick_gelu_weights_in_a_gelu_timm_model_are_refused_before_any_download(name, variant):
    """timm's own registry says which weights are natively QuickGELU; the error names the variant that
    runs them as trained (and comes before create_model, so nothing is fetched: the tests are offline)."""
    message = (
        f"timm model {name!r}: its pretrained weights were trained with QuickGELU (timm's note on {name}), but "
        f"{name.split('.')[0]} runs GELU, so its features would not be the trained model's; use name: {variant} "
        "(the same weights in QuickGELU blocks), or kwargs: {act_layer: quick_gelu}"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        build_vision_tower(VisionConfig(name=name, pretrained=True, feature_layer=-2))
    assert timm.get_pretrained_cfg(variant.split(".")[0]) is not None  # the variant timm registers


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("vit_large_patch14_clip_quickgelu_336.openai", {}),  # QuickGELU blocks for QuickGELU weights
        ("vit_large_patch14_clip_quickgelu_336", {}),  # its default tag is openai
        ("vit_large_patch14_clip_336.openai", {"act_layer": "quick_gelu"}),  # the activation set explicitly
        ("vit_large_patch14_clip_336.openai", {"act_layer": "gelu"}),  # GELU chosen knowingly
        ("vit_large_patch14_clip_336.openai_ft_in12k_in1k", {}),  # fine-tuned by timm in GELU blocks
        ("vit_large_patch14_clip_336.laion2b_ft_in12k_in1k", {}),  # trained with GELU
        ("vit_large_patch14_clip_336", {}),  # default tag laion2b_ft_in12k_in1k
        ("vit_base_patch16_224", {}),
    ],
)
def test_timm_weights_that_match_their_activation_pass(name, kwargs):
    check_timm_activation(name, kwargs)


def test_a_gelu_clip_without_pretrained_weights_builds():
    """No weights, nothing to mismatch: the architecture by the QuickGELU tag's name trains as GELU."""
    kwargs = {"embed_dim": 32, "depth": 2, "num_heads": 2}
    tower = build_vision_tower(VisionConfig(name="vit_base_patch32_clip_224.openai", kwargs=kwargs, image_size=64))
    assert isinstance(tower.model.blocks[0].mlp.act, torch.nn.GELU)
    assert tower.grid == (2, 2)


# ---- registry and fields ------------------------------------------------------------------
def test_tower_types_and_stray_fields():
    assert VISION_TOWERS.names() == ["fused", "hf", "timm"]
    with pytest.raises(
        ValueError, match=re.escape("unknown vision tower type 'open_clip'; choose one of ['fused', 'hf', 'timm']")
    ):
        build_vision_tower(VisionConfig(type="open_clip"))
    with pytest.raises(ValueError, match=re.escape("vision: type 'timm' does not use ['config', 'trust_remote_code']")):
        build_vision_tower(tiny_config(config={"model_type": "dinov2"}, trust_remote_code=True))
    with pytest.raises(
        ValueError,
        match=re.escape("unknown image_mode 'crop'; choose one of ['resize', 'resize_crop', 'pad', 'anyres']"),
    ):
        build_vision_tower(tiny_config(image_mode="crop"))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "anyres_grids entry [100, 64] is not a [width, height] of multiples of the crop size 64; use e.g. [128, 64]"
        ),
    ):
        build_vision_tower(tiny_config(image_mode="anyres", anyres_grids=[[128, 64], [100, 64]]))


# ---- image transforms ---------------------------------------------------------------------
MEAN, STD = (0.5, 0.25, 0.0), (0.5, 0.25, 2.0)


def normalised(rgb: tuple[int, int, int], mean=MEAN, std=STD) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32) / 255.0 - torch.tensor(mean)) / torch.tensor(std)


def test_image_transform_resizes_and_normalises():
    transform = ImageTransform(size=32, mean=MEAN, std=STD)
    out = transform(Image.new("RGB", (50, 20), (255, 0, 102)))
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out[0, 0], torch.full((32, 32), 1.0))
    torch.testing.assert_close(out[0, 1], torch.full((32, 32), -1.0))
    torch.testing.assert_close(out[0, 2], torch.full((32, 32), (102 / 255) / 2.0))
    grey = transform(Image.new("L", (8, 8), 51))  # grey input becomes 3 channels
    torch.testing.assert_close(grey[0, :, 0, 0], torch.tensor([(0.2 - 0.5) / 0.5, (0.2 - 0.25) / 0.25, 0.1]))
    assert transform.views_for(50, 20) == 1


def test_image_transform_matches_a_numpy_reference():
    image = Image.effect_noise((40, 40), 50).convert("RGB")
    transform = ImageTransform(size=24, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    resized = np.asarray(image.resize((24, 24), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    expected = (resized - np.array([0.4, 0.5, 0.6], dtype=np.float32)) / np.array([0.2, 0.3, 0.4], dtype=np.float32)
    torch.testing.assert_close(transform(image), torch.from_numpy(expected).permute(2, 0, 1)[None])


@pytest.mark.parametrize("size", [(64, 32), (32, 64)])
def test_pad_fills_with_the_mean_colour(size):
    transform = ImageTransform(32, MEAN, STD, mode="pad")
    out = transform(Image.new("RGB", size, (0, 255, 0)))[0]
    assert out.shape == (3, 32, 32)
    fill = normalised((127, 63, 0))  # int(255 * mean)
    band = out if size[0] > size[1] else out.transpose(1, 2)  # the image spans rows 8..23 of the square
    # bicubic blurs two rows either side of each edge
    torch.testing.assert_close(band[:, :6], fill.view(3, 1, 1).expand(3, 6, 32))
    torch.testing.assert_close(band[:, 26:], fill.view(3, 1, 1).expand(3, 6, 32))
    torch.testing.assert_close(band[:, 10:22], normalised((0, 255, 0)).view(3, 1, 1).expand(3, 12, 32))
    assert ImageTransform(32, MEAN, STD, mode="pad", fill=(1, 2, 3)).fill_colour == (1, 2, 3)


@pytest.mark.parametrize("wide", [True, False])
def test_resize_crop_keeps_the_centre_square(wide):
    """A 60x30 image whose centre 30x30 square is green and the sides red: only green remains."""
    image = Image.new("RGB", (60, 30), (255, 0, 0))
    image.paste((0, 255, 0), (15, 0, 45, 30))
    if not wide:
        image = image.transpose(Image.Transpose.ROTATE_90)
    out = ImageTransform(32, MEAN, STD, mode="resize_crop")(image)
    assert out.shape == (1, 3, 32, 32)
    # the red sides are cut off; only the blur of the crop's edge columns may tint it
    torch.testing.assert_close(
        out[0, :, 2:-2, 2:-2], normalised((0, 255, 0)).view(3, 1, 1).expand(3, 28, 28), atol=0.02, rtol=0
    )
    assert ImageTransform(32, MEAN, STD, mode="resize_crop").views_for(60, 30) == 1


@pytest.mark.parametrize(
    ("size", "canvas", "views"),
    [((128, 64), (64, 32), 3), ((64, 128), (32, 64), 3), ((100, 100), (64, 64), 5), ((300, 100), (96, 32), 4),
     ((20, 20), (64, 32), 3)],  # upscaling gains nothing: the smallest canvas wins
)  # fmt: skip
def test_anyres_picks_the_canvas_llava_next_would(size, canvas, views):
    transform = ImageTransform(32, MEAN, STD, mode="anyres")
    assert transform.grids == default_anyres_grids(32) == ((64, 32), (32, 64), (64, 64), (96, 32), (32, 96))
    assert select_best_resolution(size, transform.grids) == canvas
    out = transform(Image.effect_noise(size, 40).convert("RGB"))
    assert out.shape == (views, 3, 32, 32) and transform.views_for(*size) == views


def test_anyres_global_view_first_then_crops_in_row_major_order():
    image = Image.new("RGB", (128, 64), (255, 0, 0))
    image.paste((0, 0, 255), (64, 0, 128, 64))  # left half red, right half blue
    transform = ImageTransform(32, MEAN, STD, mode="anyres")
    out = transform(image)
    assert out.shape == (3, 3, 32, 32)
    torch.testing.assert_close(out[0], ImageTransform(32, MEAN, STD)(image)[0])  # the downscaled whole image
    # the crops of the 64x32 canvas, away from the blurred seam between them
    torch.testing.assert_close(out[1, :, :, :29], normalised((255, 0, 0)).view(3, 1, 1).expand(3, 32, 29))
    torch.testing.assert_close(out[2, :, :, 3:], normalised((0, 0, 255)).view(3, 1, 1).expand(3, 32, 29))


def test_anyres_pads_with_black_like_llava_next():
    # 100x40 -> canvas 96x32 (scale 0.8): the image is 80x32, centred with 8 black columns each side
    out = ImageTransform(32, MEAN, STD, mode="anyres")(Image.new("RGB", (100, 40), (255, 255, 255)))
    assert out.shape == (4, 3, 32, 32)
    black, white = normalised((0, 0, 0)).view(3, 1), normalised((255, 255, 255)).view(3, 1)
    torch.testing.assert_close(out[1, :, :, :7].reshape(3, -1), black.expand(3, 32 * 7))
    torch.testing.assert_close(out[3, :, :, 25:].reshape(3, -1), black.expand(3, 32 * 7))
    torch.testing.assert_close(out[2].reshape(3, -1), white.expand(3, 32 * 32))


def test_anyres_custom_grids_and_their_errors():
    transform = ImageTransform(16, MEAN, STD, mode="anyres", grids=[[32, 16], [16, 16]])
    assert transform.grids == ((32, 16), (16, 16))
    assert transform.views_for(200, 90) == 3 and transform.views_for(50, 50) == 2
    with pytest.raises(
        ValueError,
        match=re.escape(
            "anyres_grids entry [20, 16] is not a [width, height] of multiples of the crop size 16; use e.g. [16, 16]"
        ),
    ):
        ImageTransform(16, MEAN, STD, mode="anyres", grids=[[20, 16]])
    with pytest.raises(ValueError, match=re.escape("unknown image_mode 'tile'; choose one of")):
        ImageTransform(16, MEAN, STD, mode="tile")


@pytest.mark.parametrize("mode", ["resize", "resize_crop", "pad", "anyres"])
def test_transforms_survive_pickling(mode):
    transform = ImageTransform(16, MEAN, STD, mode=mode)
    copy = pickle.loads(pickle.dumps(transform))
    image = Image.effect_noise((40, 24), 40).convert("RGB")
    assert copy == transform and torch.equal(copy(image), transform(image))


def test_tower_transforms_survive_pickling():
    torch.manual_seed(0)
    for config in (tiny_config(image_mode="anyres"), hf_config("dinov2", image_mode="resize_crop"), fused_config()):
        transform = build_vision_tower(config).image_transform()
        assert pickle.loads(pickle.dumps(transform)) == transform
