"""src.model.anyres: LLaVA-NeXT's unpad merge, against transformers' LlavaNext (processor and model)."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from src.data.batching import collate_packed
from src.data.conversation import ConversationEncoder, build_template
from src.data.samples import ExampleBuilder
from src.data.stream import collate
from src.model.anyres import AnyresLayout, grid_side, unpadded_span
from src.model.language import LLMConfig, build_llm
from src.model.llava import LlavaModel
from src.model.projector import ProjectorConfig, build_projector
from src.model.vision import VisionConfig, build_vision_tower, default_anyres_grids

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "data_shards/demo/tokenizer"
CROP, PATCH = 32, 8  # the tiny tower: 32 px crops of 8 px patches, a 4x4 token grid per view
GRIDS = ((64, 32), (32, 64), (64, 64), (96, 32), (32, 96))  # (width, height), LLaVA-NeXT's default shape
SIZES = [(640, 480), (1500, 200), (200, 1500), (1, 1), (2, 3), (3, 2), (336, 336), (337, 335), (10000, 7),
         (7, 10000), (1024, 768), (768, 1024), (500, 333), (33, 97), (97, 33), (64, 32), (1920, 1080)]  # fmt: skip


def processor_for(size: int, patch: int, grids) -> object:
    """transformers' LlavaNextProcessor for these crops and canvases; its pinpoints are (height, width)."""
    from transformers import AutoTokenizer, LlavaNextImageProcessor, LlavaNextProcessor

    images = LlavaNextImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_grid_pinpoints=[[h, w] for w, h in grids],
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    return LlavaNextProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )  # fmt: skip


def random_sizes(count: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = []
    for _ in range(count):
        aspect = math.exp(rng.uniform(-4, 4))
        area = math.exp(rng.uniform(0, 15))
        sizes.append((max(1, round(math.sqrt(area * aspect))), max(1, round(math.sqrt(area / aspect)))))
    return sizes


@pytest.mark.parametrize(
    ("size", "patch", "grids"),
    [
        (336, 14, default_anyres_grids(336)),  # LLaVA-NeXT-7B: 24x24 tokens per view
        (CROP, PATCH, GRIDS),
        (384, 16, ((384, 384), (768, 384), (384, 768), (1152, 384), (768, 768), (384, 1152))),  # with a 1x1 canvas
    ],
)
def test_token_counts_equal_transformers_processor(size, patch, grids):
    """`_get_number_of_features` counts the CLS the `default` strategy then drops: ours is one fewer."""
    processor = processor_for(size, patch, grids)
    side = size // patch
    layout = AnyresLayout(size, tuple(grids), side * side)
    for width, height in SIZES + random_sizes(400, seed=size):
        expected = processor._get_number_of_features(height, width, size, size) - 1
        assert layout.tokens_for(width, height) == expected, (width, height)


def test_the_issue_numbers_and_flat():
    """The issue's figures: 640x480 and 1500x200 take 2,340 and 1,306 tokens (flat: 2,880 and 2,304)."""
    unpad = AnyresLayout(336, default_anyres_grids(336), 576)
    flat = AnyresLayout(336, default_anyres_grids(336), 576, "flat")
    assert [unpad(640, 480), unpad(1500, 200)] == [2340, 1306]
    assert [flat(640, 480), flat(1500, 200)] == [2880, 2304]
    assert flat.views_for(640, 480) == 5 and flat.views_for(100, 100) == 3  # a tie: the wide 2x1 canvas


def test_unpadded_span_equals_transformers_unpad_image():
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    for width, height in SIZES + random_sizes(300, seed=1):
        for map_w, map_h in ((48, 24), (24, 48), (48, 48), (72, 24), (8, 4), (4, 12)):
            canvas = torch.arange(map_h * map_w).view(1, map_h, map_w)
            rows, cols = unpadded_span(width, height, map_w, map_h)
            expected = unpad_image(canvas, (height, width))[0]
            assert torch.equal(canvas[0][rows, cols], expected), (width, height, map_w, map_h)


def clip_config() -> dict:
    return {"model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3,
            "num_attention_heads": 2, "image_size": CROP, "patch_size": PATCH}  # fmt: skip


LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 1024}  # fmt: skip
VOCAB, IMAGE_ID = 64, 63


def kit_model(merge: str = "unpad", feature_select: str = "patch", projector: str = "mlp") -> LlavaModel:
    torch.manual_seed(0)
    vision = build_vision_tower(
        VisionConfig(type="hf", config=clip_config(), image_mode="anyres", anyres_grids=[list(g) for g in GRIDS],
                     anyres_merge=merge, feature_select=feature_select)
    )  # fmt: skip
    kwargs = {"depth": 2} if projector == "mlp" else {}
    proj = build_projector(ProjectorConfig(projector, kwargs), vision.hidden_size, 32, vision.grid,
                           vision.num_prefix_tokens)  # fmt: skip
    llm = build_llm(LLMConfig(config=dict(LLAMA), attn_implementation="sdpa"), vocab_size=VOCAB)
    return LlavaModel(vision, proj, llm, IMAGE_ID).eval()


def images_of(sizes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(seed)
    return [
        Image.fromarray(torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=generator).numpy())
        for w, h in sizes
    ]


def test_merged_features_equal_transformers_llava_next_on_the_same_weights():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    kit = kit_model()
    vision = {k: v for k, v in clip_config().items() if k != "model_type"}
    text = {k: v for k, v in LLAMA.items() if k != "model_type"} | {"vocab_size": VOCAB}
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text), image_token_index=IMAGE_ID,
        image_grid_pinpoints=[[h, w] for w, h in GRIDS], vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )  # fmt: skip
    torch.manual_seed(1)
    reference = LlavaNextForConditionalGeneration(config).eval()
    loaded = kit.vision.model.load_state_dict(reference.model.vision_tower.state_dict(), strict=False)
    assert loaded.missing_keys == []  # only the layers after the one read (and the post norm) are left over
    hf_projector = reference.model.multi_modal_projector
    with torch.no_grad():
        for ours, theirs in ((kit.projector.layers[0], hf_projector.linear_1), (kit.projector.layers[2], hf_projector.linear_2)):  # fmt: skip
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)
        kit.projector.anyres.image_newline.copy_(reference.model.image_newline)

    sizes = [(64, 48), (150, 20), (20, 150), (30, 30), (100, 100), (17, 90), (640, 480), (1, 1)]
    transform = kit.vision.image_transform()
    pixels = torch.cat([transform(image) for image in images_of(sizes)])
    image_sizes = torch.tensor([[h, w] for w, h in sizes])
    with torch.no_grad():
        ours = kit.image_features(pixels, image_sizes)
        theirs = reference.model.get_image_features(pixel_values=pixels, image_sizes=image_sizes).pooler_output
    assert [len(t) for t in theirs] == [kit.image_token_count(w, h) for w, h in sizes]
    torch.testing.assert_close(ours, torch.cat(theirs), atol=1e-5, rtol=1e-5)


def test_image_newline_is_the_projectors_initialised_as_llava_next():
    kit = kit_model()
    newline = kit.projector.anyres.image_newline
    assert newline.shape == (32,) and "anyres.image_newline" in dict(kit.projector.named_parameters())
    big = LlavaModel(kit.vision, build_projector(ProjectorConfig("mlp", {"depth": 2}), 16, 4096, (4, 4)),
                     build_llm(LLMConfig(config=dict(LLAMA) | {"hidden_size": 4096, "num_attention_heads": 32,
                                                               "num_key_value_heads": 32, "intermediate_size": 8},),
                               vocab_size=VOCAB), IMAGE_ID)  # fmt: skip
    assert abs(big.projector.anyres.image_newline.std().item() - 1 / 64) < 0.1 / 64  # normal, std 1 / sqrt(hidden)


def test_image_newline_trains_freezes_and_checkpoints_with_the_projector():
    from src.model.weights import load_parts
    from src.training.stage import FreezeConfig, OptimizerConfig, apply_freeze, kept_in_checkpoint, parameter_groups

    kit = kit_model()
    newline = kit.projector.anyres.image_newline
    apply_freeze(kit, FreezeConfig())  # stage 1: the projector alone
    assert newline.requires_grad
    grouped = {id(p) for group in parameter_groups(kit, OptimizerConfig()) for p in group["params"]}
    assert id(newline) in grouped
    assert "projector.anyres.image_newline" in kept_in_checkpoint(kit, {"vision", "llm"})
    apply_freeze(kit, FreezeConfig(projector="frozen", llm="full"))
    assert not newline.requires_grad
    other = kit_model()
    with torch.no_grad():
        kit.projector.anyres.image_newline.fill_(0.5)
    state = {k: v for k, v in kit.state_dict().items() if k.startswith("projector.")}
    assert load_parts(other, state) == ["projector"]  # init_from a stage-1 projector brings its newline
    assert torch.equal(other.projector.anyres.image_newline, torch.full((32,), 0.5))


def test_unpad_needs_a_square_grid_and_flat_does_not():
    message = "anyres_merge unpad lays each crop's tokens out as a square grid, but projector MLPProjector makes 17 "
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        kit_model(feature_select="cls_patch")
    assert "use vision.anyres_merge: flat" in str(error.value)
    flat = kit_model("flat", feature_select="cls_patch")
    assert not hasattr(flat.projector, "anyres") and flat.image_token_count(640, 480) == 17 * 5  # a 2x2 canvas: 5 views
    with pytest.raises(ValueError, match="makes 5 tokens per view"):
        grid_side(5, 0)


def test_config_names_the_merges():
    with pytest.raises(ValueError, match=re.escape("unknown vision.anyres_merge 'spatial'; choose one of ['unpad', 'flat']")):  # fmt: skip
        VisionConfig(image_mode="anyres", anyres_merge="spatial")
    with pytest.raises(ValueError, match="vision.anyres_merge 'flat' applies to image_mode anyres only, not 'pad'"):
        VisionConfig(image_mode="pad", anyres_merge="flat")
    assert VisionConfig(image_mode="anyres").anyres_merge == "unpad"


def test_unpad_without_image_sizes_is_a_clear_error():
    kit = kit_model()
    pixels = kit.vision.image_transform()(images_of([(64, 32)])[0])
    ids = torch.tensor([[1] + [IMAGE_ID] * kit.image_token_count(64, 32)])
    with pytest.raises(ValueError, match=re.escape("anyres_merge unpad needs image_sizes (images, 2)")):
        kit.embed(ids, pixels)
    with pytest.raises(ValueError, match=re.escape("image_sizes [(32, 65)] make 4 anyres views but the batch has 3")):
        kit.embed(ids, pixels, torch.tensor([[32, 65]]))  # another image's size: a 3x1 canvas
    with pytest.raises(ValueError, match=re.escape("1 images (3 views) make 52 tokens but the batch has 40")):
        kit.embed(torch.tensor([[1] + [IMAGE_ID] * 40]), pixels, torch.tensor([[32, 64]]))


def examples_for(kit: LlavaModel, sizes: list[list[tuple[int, int]]]):
    """Caption examples through the data pipeline (tokenizer, transform, token counts), one per list of sizes."""
    from transformers import AutoTokenizer

    from src.data.tokenizer import prepare_tokenizer

    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(TOKENIZER))
    encoder = ConversationEncoder(tokenizer, build_template("plain", ""), kit.image_tokens, max_length=4096)
    builder = ExampleBuilder(encoder, kit.vision.image_transform(), "caption", image_token_count=kit.image_token_count)
    kit.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    examples = []
    for k, image_sizes in enumerate(sizes):
        examples += builder({"caption": f"scene {k} of shapes"}, images_of(image_sizes, seed=k))
    return examples, tokenizer.pad_token_id


def test_packed_equals_padded_with_anyres_images_of_different_sizes():
    kit = kit_model()
    kit.llm.resize_token_embeddings(4096, mean_resizing=False)
    examples, pad = examples_for(kit, [[(64, 48)], [(150, 20), (20, 150)], [(30, 30)]])
    padded = collate(examples, pad)
    packed = collate_packed([[examples[0], examples[2]], [examples[1]]], pad)
    assert padded["image_sizes"].tolist() == [[48, 64], [20, 150], [150, 20], [30, 30]]
    assert packed["image_sizes"].tolist() == [[48, 64], [30, 30], [20, 150], [150, 20]]
    slots = (padded["input_ids"] == kit.image_token_id).sum(dim=1).tolist()
    counts = [kit.image_token_count(w, h) for w, h in ((64, 48), (150, 20), (20, 150), (30, 30))]
    assert slots == [counts[0], counts[1] + counts[2], counts[3]] == [70, 42 + 52, 36]  # rows of 13, of 3
    with torch.no_grad():
        got = kit(packed["input_ids"], None, packed["pixel_values"], packed["labels"],
                  position_ids=packed["position_ids"], image_sizes=packed["image_sizes"])  # fmt: skip
        expected = kit(padded["input_ids"], padded["attention_mask"], padded["pixel_values"], padded["labels"],
                       image_sizes=padded["image_sizes"])  # fmt: skip
    assert got.supervised_tokens == expected.supervised_tokens > 0
    assert abs(got.loss.item() - expected.loss.item()) < 1e-5
    # picking rows back out of a batch (SampleGenerations) finds each row's views and sizes
    spans = kit.image_spans(padded["input_ids"], padded["image_sizes"])
    assert padded["pixel_values"].shape[0] == 5 + 4 + 4 + 3  # a 2x2, two 3x1 and a 2x1 canvas, + base views
    assert spans == [(slice(0, 5), slice(0, 1)), (slice(5, 13), slice(1, 3)), (slice(13, 16), slice(3, 4))]


def test_a_tiny_anyres_model_trains_a_step_and_its_newline_learns():
    kit = kit_model().train()
    kit.llm.resize_token_embeddings(4096, mean_resizing=False)
    examples, pad = examples_for(kit, [[(64, 48)], [(150, 20)]])
    batch = collate(examples, pad)
    newline = kit.projector.anyres.image_newline
    before = newline.detach().clone()
    optimizer = torch.optim.AdamW(kit.projector.parameters(), lr=1e-2)
    out = kit(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"],
              image_sizes=batch["image_sizes"])  # fmt: skip
    out.loss.backward()
    assert torch.isfinite(out.loss) and newline.grad is not None and newline.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(newline.detach(), before)


def test_a_blank_image_runs_the_merge_too():
    """Under FSDP every rank runs every unit: a text-only batch runs the tower, projector and newline on a blank."""
    kit = kit_model()
    kit.encode_always = True
    ids = torch.tensor([[1, 2, 3]])
    pixels, sizes = kit._blank_image(torch.device("cpu"))
    assert pixels.shape == (3, 3, CROP, CROP) and sizes.tolist() == [[CROP, CROP]]
    with torch.no_grad():
        assert torch.equal(kit.embed(ids, None), kit.llm.get_input_embeddings()(ids))


def test_fsdp2_gathers_the_newline_where_the_merge_runs():
    """`shard_model` makes the newline a unit of its own: the merge runs outside the projector's forward,
    where the projector unit's parameters are sharded. One gloo process: the same gathers as on many."""
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from src.training.sharding import FSDPConfig, shard_model

    kit = kit_model()
    kit.llm.resize_token_embeddings(4096, mean_resizing=False)
    examples, pad = examples_for(kit, [[(64, 48)], [(150, 20)]])
    batch = collate(examples, pad)
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
    with torch.no_grad():
        expected = kit(*args, image_sizes=batch["image_sizes"]).loss
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        units = shard_model(kit, init_device_mesh("cpu", (1,)), FSDPConfig())
        assert units[units.index("projector") - 1] == "projector.anyres"
        with torch.no_grad():
            got = kit(*args, image_sizes=batch["image_sizes"]).loss
            text_only = kit(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long)).hidden_states
        assert abs(got.item() - expected.item()) < 1e-5 and torch.isfinite(text_only).all()
    finally:
        dist.destroy_process_group()


def test_a_projector_without_the_newline_loads_and_the_newline_keeps_its_start(caplog):
    """LLaVA-NeXT's stage 1 is LLaVA-1.5's connector (one view per image) and its stage 2 starts
    image_newline at its initialisation: init_from takes such a projector, the kit's or LLaVA's own
    mm_projector.bin, into an anyres unpad model, and says that the newline was not in the file."""
    from src.model.weights import load_parts

    single_view = kit_model(merge="flat")  # the same projector, no newline
    with torch.no_grad():
        for p in single_view.projector.parameters():
            p.add_(1.0)
    state = {k: v for k, v in single_view.state_dict().items() if k.startswith("projector.")}
    assert "projector.anyres.image_newline" not in state
    llava_names = {"model.mm_projector." + k.removeprefix("projector.layers."): v for k, v in state.items()}
    assert all(k.startswith("projector.layers.") for k in state)  # LLaVA: mm_projector.{0,2}.*
    for file in (state, llava_names):
        kit = kit_model()
        start = kit.projector.anyres.image_newline.detach().clone()
        with caplog.at_level("WARNING", logger="src.model.weights"):
            assert load_parts(kit, file) == ["projector"]
        assert torch.equal(kit.projector.anyres.image_newline, start)
        for name, value in state.items():
            assert torch.equal(kit.state_dict()[name], value), name
        assert "have no projector.anyres.image_newline" in caplog.text
        caplog.clear()
    with pytest.raises(ValueError, match=r"keys missing from parts \['projector'\]: \['projector.layers.0.bias'\]"):
        load_parts(kit_model(), {k: v for k, v in state.items() if k != "projector.layers.0.bias"})
