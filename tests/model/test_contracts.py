"""Conformance: every registered vision tower family, every registered projector and every kind of
LLM the kit builds keeps the contract the rest of the kit relies on, checked on a tiny instance.

A new family, projector or LLM kind is covered by adding its tiny config to a table here; a
registered family without one fails `test_every_registered_tower_family_has_a_tiny_config`.
The checks compare each tower with itself built another way (full depth against cut, with
and without activation checkpointing, two seeds), since what is checked is the contract, not
the numbers of one model (tests/model/test_vision.py compares those with transformers' and
timm's own models).
"""

from __future__ import annotations

import copy
import functools
import pickle
import re
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from tiny_models import tiny_hf_vision_configs
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from src.model.image_transform import ImageTransform
from src.model.language import LLMConfig, build_llm
from src.model.llava import LlavaModel
from src.model.lora import LoraSettings, apply_lora
from src.model.projector import PROJECTORS, Projector, ProjectorConfig, build_projector
from src.model.vision import VISION_TOWERS, VisionConfig, VisionTower, build_vision_tower, weights_from_hub
from src.model.vision.base import COMMON_FIELDS, resolve_layer
from src.training.sharding import checkpoint_trained, decoder_layers, shard_units, tower_units
from src.training.stage import kept_in_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

HF = tiny_hf_vision_configs(width=16, intermediate=32)
TIMM_VIT = {"name": "vit_tiny_patch16_224", "image_size": 32,
            "kwargs": {"patch_size": 8, "embed_dim": 16, "depth": 3, "num_heads": 2}}  # fmt: skip
TINY_TOWERS: dict[str, dict[str, dict]] = {
    "timm": {
        "vit": TIMM_VIT,
        "convnext": {"name": "convnext_atto", "image_size": 64, "kwargs": {"dims": (8, 16, 24, 32), "depths": (1,) * 4}},
    },
    "hf": {family: {"type": "hf", "config": config} for family, config in HF.items()},
    "fused": {
        "dinov2_siglip": {"type": "fused", "towers": [
            {"type": "hf", "config": HF["dinov2"]},
            {"type": "hf", "config": HF["siglip"] | {"patch_size": 4, "image_size": 16}},
        ]},
    },
}  # fmt: skip
"""Per registered family, tiny configs of it (random weights), each checked against the whole contract."""
TOWER_CASES = [
    pytest.param(family, case, id=f"{family}-{case}") for family, cases in TINY_TOWERS.items() for case in cases
]


def image() -> Image.Image:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (30, 40, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def build(config: dict, seed: int = 0) -> VisionTower:
    torch.manual_seed(seed)
    return build_vision_tower(VisionConfig(**config)).eval()


def as_tokens(output: object) -> torch.Tensor:
    """A block's output as (images, tokens, channels): the hidden states of a tuple, a CNN map flattened."""
    hidden = output[0] if isinstance(output, tuple) else output
    return hidden.flatten(2).transpose(1, 2) if hidden.ndim == 4 else hidden


def loss_and_grads(tower: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    tower.zero_grad()
    loss = tower(pixels).square().mean()
    loss.backward()
    grads = {name.replace("_checkpoint_wrapped_module.", ""): p.grad for name, p in tower.named_parameters()}
    return loss.detach(), grads


# ---- the tower contract ----------------------------------------------------------------------
def check_tower_contract(config: dict) -> None:
    """Every promise of `VisionTower`, on one config; an AssertionError says which one is broken."""
    family = config.get("type", "timm")
    cls = VISION_TOWERS.get(family)
    where = f"tower family {family!r} ({cls.__name__})"
    assert cls.type_name == family, f"{where}: type_name {cls.type_name!r} is not its registered name"
    assert COMMON_FIELDS <= cls.config_fields, (
        f"{where}: config_fields lacks {sorted(COMMON_FIELDS - cls.config_fields)}"
    )
    tower = build(config)
    vision_config = VisionConfig(**config)

    # the transform: picklable (it runs in loader workers), giving the pixels forward takes
    transform = tower.image_transform()
    assert isinstance(transform, ImageTransform), f"{where}: image_transform() is a {type(transform).__name__}"
    assert pickle.loads(pickle.dumps(transform)) == transform, f"{where}: the transform does not pickle"
    pixels = transform(image())
    assert pixels.shape == (1, 3, tower.input_size, tower.input_size), f"{where}: transform gives {pixels.shape}"

    # the output: grid x grid tokens (after the prefix ones) of hidden_size channels
    h, w = tower.grid
    assert h > 0 and w > 0 and tower.num_tokens == h * w + tower.num_prefix_tokens, f"{where}: token counts"
    with torch.no_grad():
        features = tower(pixels)
    assert features.shape == (1, tower.num_tokens, tower.hidden_size), (
        f"{where}: forward gives {tuple(features.shape)}, the contract says (1, {tower.num_tokens}, {tower.hidden_size})"
    )
    if vision_config.feature_select == "patch":
        assert tower.num_prefix_tokens == 0, f"{where}: feature_select patch keeps {tower.num_prefix_tokens} prefix"

    # the blocks: non-empty, submodules, none inside another, the same objects every call
    blocks = tower.wrap_modules()
    assert blocks, f"{where}: wrap_modules() is empty, so FSDP and activation checkpointing would skip the tower"
    assert [id(b) for b in tower.wrap_modules()] == [id(b) for b in blocks], f"{where}: wrap_modules() changes"
    inside = {id(m) for m in tower.modules()}
    assert all(id(b) in inside for b in blocks), f"{where}: a block of wrap_modules() is not a submodule"
    for i, block in enumerate(blocks):
        nested = [
            j for j, other in enumerate(blocks) if other is not block and any(m is other for m in block.modules())
        ]
        assert not nested, f"{where}: block {i} holds blocks {nested}: FSDP units must not nest"

    # FSDP: each block is a unit owning parameters; the tower unit owns the rest; all are owned
    owner: dict[int, str] = {}
    for name, unit in tower_units(tower):
        for param in unit.parameters():
            owner.setdefault(id(param), name)
    assert len(owner) == len(list(tower.parameters())), f"{where}: parameters outside every FSDP unit"
    for i, block in enumerate(blocks):
        assert {owner[id(p)] for p in block.parameters()} == {f"vision.block{i}"}, f"{where}: block {i} owns nothing"

    # the feature layer: later blocks dropped, the output that of the block read in the full-depth tower
    if "feature_layer" in cls.config_fields:
        full = build(config | {"feature_layer": -1})
        depth = full.layer + 1
        assert tower.layer == resolve_layer(vision_config.feature_layer, depth, "block"), f"{where}: layer"
        assert len(blocks) == tower.layer + 1, f"{where}: keeps {len(blocks)} blocks to read block {tower.layer}"
        seen = []
        full.wrap_modules()[tower.layer].register_forward_hook(lambda _m, _a, out: seen.append(as_tokens(out)))
        with torch.no_grad():
            full(pixels)
        torch.testing.assert_close(features, seen[0][:, -tower.num_tokens :], msg=f"{where}: feature_layer not read")
    else:
        assert tower.layer is None, f"{where}: reads layer {tower.layer} but does not take feature_layer"

    # feature_select cls_patch: the prefix tokens first, then the same patch tokens
    try:
        with_prefix = build(config | {"feature_select": "cls_patch"})
    except ValueError as error:
        assert "cls_patch" in str(error) or "patch" in str(error), f"{where}: cls_patch refused unclearly: {error}"
    else:
        assert with_prefix.num_prefix_tokens > 0, f"{where}: cls_patch keeps no prefix token"
        with torch.no_grad():
            kept = with_prefix(pixels)
        torch.testing.assert_close(kept[:, with_prefix.num_prefix_tokens :], features, msg=f"{where}: cls_patch")

    # activation checkpointing: every block wrapped, run again in backward, the same loss and gradients
    plain_loss, plain_grads = loss_and_grads(tower, pixels)
    wrapped = copy.deepcopy(tower)
    assert checkpoint_trained(wrapped, wrapped.wrap_modules()) == len(blocks), f"{where}: blocks not checkpointed"
    calls = [0] * len(blocks)
    for i, block in enumerate(wrapped.wrap_modules()):
        assert isinstance(block, CheckpointWrapper), f"{where}: wrap_modules() does not see the wrapped block {i}"
        block._checkpoint_wrapped_module.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    loss, grads = loss_and_grads(wrapped, pixels)
    assert calls == [2] * len(blocks), f"{where}: block forwards with checkpointing {calls}, expected 2 each"
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    assert grads.keys() == plain_grads.keys(), f"{where}: checkpointing changed the parameter names"
    for name, grad in plain_grads.items():
        if grad is None:
            assert grads[name] is None, f"{where}: {name}"
        else:
            torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-7, msg=f"{where}: gradient of {name}")

    # parameters kept only for the weights' sake never run and never train
    names = {id(param): name for name, param in tower.named_parameters()}
    for param in tower.unused_parameters():
        name = names.get(id(param))
        assert name is not None, f"{where}: unused_parameters() names a parameter outside the tower"
        assert not param.requires_grad and plain_grads[name] is None, f"{where}: unused {name} trains"

    # rebuilt or kept: random weights are not rebuilt, so a checkpoint must keep every tower key
    assert cls.weights_from_hub(vision_config) is weights_from_hub(config) is False, f"{where}: random weights rebuilt"
    other = build(config, seed=1)
    assert any(
        not torch.equal(a, b) for a, b in zip(tower.state_dict().values(), other.state_dict().values(), strict=True)
    ), f"{where}: two seeds give the same weights, yet they are kept in checkpoints"
    holder = nn.Module()
    holder.vision = tower.requires_grad_(False)
    assert kept_in_checkpoint(holder, set()) == set(holder.state_dict()), f"{where}: checkpoint drops tower keys"


def test_every_registered_tower_family_has_a_tiny_config():
    missing = sorted(set(VISION_TOWERS.names()) - set(TINY_TOWERS))
    assert not missing, f"tower families without a tiny config in TINY_TOWERS (add one to check them): {missing}"
    assert set(TINY_TOWERS) <= set(VISION_TOWERS.names())


@pytest.mark.parametrize(("family", "case"), TOWER_CASES)
def test_every_tower_family_keeps_the_contract(family, case):
    check_tower_contract(TINY_TOWERS[family][case])


# ---- pretrained weights: rebuilt from files, so checkpoints may leave them out ------------------
@pytest.fixture(scope="module")
def pretrained_configs(tmp_path_factory) -> dict[str, dict]:
    """Per family, a config whose weights load from a local file or folder (as from the hub)."""
    from transformers import AutoConfig, AutoModel

    folder = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(5)
    values = dict(HF["clip"])
    AutoModel.from_config(AutoConfig.for_model(values.pop("model_type"), **values)).save_pretrained(folder / "clip")
    timm_model = timm.create_model(
        TIMM_VIT["name"], num_classes=0, img_size=TIMM_VIT["image_size"], **TIMM_VIT["kwargs"]
    )
    torch.save(timm_model.state_dict(), folder / "vit.pth")
    timm_config = TIMM_VIT | {
        "pretrained": True,
        "kwargs": TIMM_VIT["kwargs"] | {"pretrained_cfg_overlay": {"file": str(folder / "vit.pth")}},
    }
    hf_config = {"type": "hf", "name": str(folder / "clip")}
    return {
        "timm": timm_config,
        "hf": hf_config,
        "fused": {"type": "fused", "towers": [hf_config, hf_config | {"image_size": 32}]},
    }


@pytest.mark.parametrize("family", VISION_TOWERS.names())
def test_pretrained_weights_are_rebuilt_the_same_so_checkpoints_leave_them_out(family, pretrained_configs):
    assert family in pretrained_configs, f"tower family {family!r} has no pretrained config in this test"
    config = pretrained_configs[family]
    assert weights_from_hub(config) is True
    first, second = build(config, seed=0), build(config, seed=1)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{family}: {name} differs between two builds, yet checkpoints leave it out"
    holder = nn.Module()
    holder.vision = first.requires_grad_(False)
    assert kept_in_checkpoint(holder, {"vision"}) == set()


def test_a_pretrained_flag_left_false_is_kept():
    assert weights_from_hub({"type": "hf", "name": "some/clip", "pretrained": False}) is False
    assert weights_from_hub({"type": "fused", "towers": [{"type": "hf", "name": "a"}, TIMM_VIT]}) is False


# ---- what an incomplete family looks like -------------------------------------------------------
class ToyTower(VisionTower):
    """A family that forgets `wrap_modules` and `weights_from_hub`: it cannot even be built."""

    type_name = "toy"

    def __init__(self, config: VisionConfig) -> None:
        super().__init__(config)
        self.input_size, self.patch_size = 16, 8
        self.proj = nn.Conv2d(3, 4, 8, stride=8)

    hidden_size = 4
    grid = (2, 2)
    num_prefix_tokens = 0

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values).flatten(2).transpose(1, 2)


class ToyWithoutBlocks(ToyTower):
    """Implements every member, but names no blocks: FSDP and checkpointing would skip it silently."""

    type_name = "toy_without_blocks"

    def wrap_modules(self) -> list[nn.Module]:
        return []

    @classmethod
    def weights_from_hub(cls, config: VisionConfig) -> bool:
        return False


def test_a_family_missing_members_fails_the_check_naming_them(monkeypatch):
    monkeypatch.setitem(VISION_TOWERS._items, "toy", ToyTower)
    with pytest.raises(TypeError, match=re.escape("Can't instantiate abstract class ToyTower")) as caught:
        check_tower_contract({"type": "toy"})
    assert "wrap_modules" in str(caught.value) and "weights_from_hub" in str(caught.value)


def test_a_family_without_blocks_fails_the_check_saying_why(monkeypatch):
    monkeypatch.setitem(VISION_TOWERS._items, "toy_without_blocks", ToyWithoutBlocks)
    with pytest.raises(AssertionError, match=re.escape("wrap_modules() is empty, so FSDP and activation")):
        check_tower_contract({"type": "toy_without_blocks"})


def test_a_registered_family_without_a_tiny_config_is_named(monkeypatch):
    monkeypatch.setitem(VISION_TOWERS._items, "toy_without_blocks", ToyWithoutBlocks)
    with pytest.raises(AssertionError, match=re.escape("without a tiny config in TINY_TOWERS (add one to check")):
        test_every_registered_tower_family_has_a_tiny_config()


# ---- projectors: their token count is what they make of each tower's grid ---------------------
@functools.cache
def tower_output(family: str, case: str) -> tuple[VisionTower, torch.Tensor]:
    tower = build(TINY_TOWERS[family][case])
    with torch.no_grad():
        return tower, tower(tower.image_transform()(image()))


@pytest.mark.parametrize(("family", "case"), TOWER_CASES)
@pytest.mark.parametrize("name", PROJECTORS.names())
def test_every_projector_makes_num_tokens_of_every_towers_grid(name, family, case):
    tower, features = tower_output(family, case)
    width = tower.hidden_size  # so that identity fits too
    assert issubclass(PROJECTORS.get(name), Projector)
    try:
        projector = build_projector(ProjectorConfig(name), width, width, tower.grid, tower.num_prefix_tokens)
    except ValueError as error:  # a spatial projector refuses a grid it cannot pool, saying what to set
        assert re.search(r"projector|factor|grid", str(error)), error
        pytest.skip(f"{name} refuses this grid: {error}")
    with torch.no_grad():
        tokens = projector(features)
    assert tokens.shape == (1, projector.num_tokens, width), f"{name}: {tuple(tokens.shape)} vs {projector.num_tokens}"


# ---- LLMs: every kind the kit builds has decoder layers to shard, checkpoint and train ---------
LLM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
LLM_KINDS = {
    "llama": dict(LLM, model_type="llama"),
    "qwen2": dict(LLM, model_type="qwen2"),
    "gemma2": dict(LLM, model_type="gemma2", head_dim=16),
    "phi3": dict(LLM, model_type="phi3"),
}
"""Inline configs of several architectures; `lora` and `from_folder` wrap / load the llama one."""


def build_llava(kind: str, folder: Path) -> LlavaModel:
    torch.manual_seed(0)
    vision = build_vision_tower(VisionConfig(**TIMM_VIT))
    if kind == "from_folder":
        llm = build_llm(LLMConfig(name=str(folder), attn_implementation="eager"), vocab_size=70)
    else:
        llm = build_llm(LLMConfig(config=LLM_KINDS.get(kind, LLM_KINDS["llama"]), attn_implementation="eager"), 70)
    if kind == "lora":
        llm = apply_lora(llm, LoraSettings(r=4))
    projector = build_projector(ProjectorConfig("linear"), vision.hidden_size, 32, vision.grid)
    return LlavaModel(vision, projector, llm, image_token_id=69).eval()


@pytest.fixture(scope="module")
def llm_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llm")
    torch.manual_seed(3)
    build_llm(LLMConfig(config=LLM_KINDS["llama"], attn_implementation="eager"), vocab_size=70).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", [*LLM_KINDS, "lora", "from_folder"])
def test_every_llm_kind_has_layers_to_shard_and_checkpoint(kind, llm_folder):
    model = build_llava(kind, llm_folder)
    layers = list(decoder_layers(model))
    assert len(layers) == LLM["num_hidden_layers"]
    names = [name for name, _ in shard_units(model)]
    assert names[-1] == "root" and [n for n in names if n.startswith("llm.")] == ["llm.layer0", "llm.layer1"]
    ids = torch.tensor([[1, 5, 9, 10, 11, 12]])
    trained = [p for layer in layers for p in layer.parameters() if p.requires_grad]
    assert trained, f"{kind}: nothing in the decoder layers trains"

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = model.llm(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trained]

    plain_loss, plain_grads = loss_and_grads()
    assert checkpoint_trained(model, layers) == len(layers)
    assert all(isinstance(layer, CheckpointWrapper) for layer in decoder_layers(model))
    loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    for grad, plain in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(grad, plain, rtol=1e-6, atol=1e-7)
    if kind == "from_folder":  # a named LLM is rebuilt, not kept: two builds give the same weights
        again = build_llava(kind, llm_folder)
        for (name, a), b in zip(model.llm.state_dict().items(), again.llm.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
