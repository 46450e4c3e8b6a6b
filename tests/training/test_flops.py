"""src.training.flops: the FLOPs model by hand and of built modules, the peak FLOP/s lookup; and
the image tokens a step's FLOPs are counted with, from the batch's placeholders (anyres + unpad
against transformers' LlavaNextProcessor)."""

from __future__ import annotations

import pytest

from src.model.language import LLMConfig
from src.model.lora import LoraSettings
from src.training.flops import FlopsModel, chip_of, flops_model, flops_model_of, flops_per_token, mfu, peak_flops_of
from src.training.module import FreezeConfig, LlavaLitModule
from src.training.telemetry import TrainingTelemetry
from tests.training.test_callbacks import TINY

# ---- the FLOPs model by hand ----------------------------------------------------------------


def test_flops_model_counts_trained_frozen_through_and_frozen_at_the_input():
    # LLaVA stage 1: frozen tower (2N, no autograd), trained projector (6N), frozen LLM the
    # gradient crosses (4N), its head too; attention 12 * layers * hidden
    stage1 = {"vision": (0, 100), "projector": (10, 10), "llm": (0, 1000), "head": (0, 50)}
    model = flops_model(stage1, layers=2, hidden=8, llm_mode="frozen", tower_tokens=5, image_tokens=4)
    assert model == FlopsModel(per_token=4 * 1000, per_supervised_token=4 * 50, attention=12 * 2 * 8,
                               per_view=2 * 100 * 5 + 6 * 10 * 4)  # fmt: skip
    # everything trains: 6N everywhere
    full = {"vision": (100, 100), "projector": (10, 10), "llm": (1000, 1000), "head": (50, 50)}
    model = flops_model(full, layers=2, hidden=8, tower_tokens=5, image_tokens=4)
    assert model == FlopsModel(6000, 300, 192, 6 * 100 * 5 + 6 * 10 * 4)
    # a projector frozen above a trained tower lets the gradient through: 4N
    model = flops_model({**full, "projector": (0, 10)}, layers=2, hidden=8, tower_tokens=5, image_tokens=4)
    assert model.per_view == 6 * 100 * 5 + 4 * 10 * 4


def test_flops_model_of_lora_and_partial_llms():
    # LoRA with everything below frozen: base 4N (its adapters sit in every layer), adapter 6N
    lora = {"vision": (0, 100), "projector": (0, 10), "llm": (20, 1020), "head": (0, 50)}
    model = flops_model(lora, layers=2, hidden=8, llm_mode="lora", tower_tokens=5, image_tokens=4)
    assert model == FlopsModel(6 * 20 + 4 * 1000, 4 * 50, 12 * 2 * 8, 2 * 100 * 5 + 2 * 10 * 4)
    # the last of 2 layers trains, nothing below: the frozen layers run forward only (2N), the
    # attention of one layer has a backward (3 x 4 x hidden) and of the other not (4 x hidden)
    partial = {"vision": (0, 100), "projector": (0, 10), "llm": (300, 1000), "head": (0, 50)}
    model = flops_model(partial, layers=2, hidden=8, llm_mode="partial", trained_layers=1)
    assert (model.per_token, model.attention, model.per_supervised_token) == (6 * 300 + 2 * 700, 4 * 8 * (1 + 3), 200)


def _params(module, exclude=()) -> tuple[int, int]:
    ids = {id(p) for p in exclude}
    params = [p for p in module.parameters() if id(p) not in ids]
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_flops_model_of_a_built_module_leaves_out_embeddings_and_counts_the_head_per_supervised_token(demo_dir, mode):
    llm = TINY["llm"] if mode == "full" else LLMConfig(config=TINY["llm"]["config"], lora=LoraSettings(r=4, alpha=8))
    freeze = FreezeConfig("full", "full", "full") if mode == "full" else FreezeConfig("frozen", "full", "lora")
    module = LlavaLitModule(str(demo_dir / "tokenizer"), freeze=freeze, **{**TINY, "llm": llm})
    module.configure_model()
    model = module.model
    embed, head = model.llm.get_input_embeddings().weight, model.llm.get_output_embeddings().weight
    (v_t, v_all), (p_t, p_all) = _params(model.vision), _params(model.projector)
    l_t, l_all = _params(model.llm, exclude=[embed, head])
    assert (model.vision.num_tokens, model.image_tokens) == (4, 4) and p_t == p_all  # the projector trains
    got = flops_model_of(module)
    if mode == "full":
        assert got == FlopsModel(6 * l_all, 6 * head.numel(), 12 * 2 * 32, 6 * v_all * 4 + 6 * p_all * 4)
    else:
        assert 0 < l_t < l_all and v_t == 0
        assert got == FlopsModel(
            6 * l_t + 4 * (l_all - l_t), 4 * head.numel(), 12 * 2 * 32, 2 * v_all * 4 + 6 * p_all * 4
        )
    per_token = flops_per_token(module, seq_len=100, views_per_token=0.01, supervised_fraction=0.25)
    assert per_token == pytest.approx(
        got.per_token + got.attention * 100 + got.per_view * 0.01 + 0.25 * got.per_supervised_token
    )


def test_step_flops_and_mfu():
    model = FlopsModel(per_token=10.0, per_supervised_token=3.0, attention=2.0, per_view=100.0)
    # two examples of 3 and 5 tokens, 4 supervised, 2 views
    assert model.step_flops(tokens=8, squared_lengths=9 + 25, supervised=4, views=2) == 80 + 68 + 12 + 200
    assert mfu(flops=1e12, seconds=2.0, peak_flops=1e12, devices=2) == 0.25


@pytest.mark.parametrize(
    ("name", "chip", "bf16"),
    [
        ("NVIDIA H100 80GB HBM3", "h100 sxm", 989.4e12),
        ("NVIDIA H100 PCIe", "h100 pcie", 756e12),
        ("NVIDIA H100 NVL", "h100 nvl", 835.5e12),
        ("NVIDIA H200", "h200", 989.5e12),
        ("NVIDIA H200 NVL", "h200 nvl", 835.5e12),
        ("NVIDIA A100-SXM4-80GB", "a100", 312e12),
        ("NVIDIA A100-SXM4-40GB", "a100", 312e12),
        ("NVIDIA A100 80GB PCIe", "a100", 312e12),
        ("NVIDIA L40S", "l40s", 362.05e12),
        ("NVIDIA L40", None, None),
        ("NVIDIA GeForce RTX 4090", None, None),
    ],
)
def test_peak_flops_by_the_name_torch_reports(name, chip, bf16):
    assert chip_of(name) == chip
    assert peak_flops_of(name, "bf16") == bf16


def test_peak_table_from_yaml_comes_first_and_missing_dtypes_are_none():
    assert peak_flops_of("NVIDIA GeForce RTX 4090", "bf16", {"RTX 4090": 165.2e12}) == 165.2e12
    assert peak_flops_of("NVIDIA H100 80GB HBM3", "bf16", {"h100": 1.0}) == 1.0
    assert peak_flops_of("NVIDIA A100-SXM4-80GB", "fp8") is None
    with pytest.raises(ValueError, match="unknown dtype 'bfloat16'"):
        TrainingTelemetry(dtype="bfloat16")


def test_image_tokens_of_an_anyres_unpad_batch_are_its_placeholders_not_views_times_tokens(demo_dir):
    """Under anyres + unpad an image takes the tokens its size leaves (transformers' LlavaNextProcessor
    count), not its views x tokens per view: the step's counts read them off the batch, and they are
    exactly the image features the model splices in."""
    from PIL import Image

    from src.data.conversation import ConversationEncoder, build_template
    from src.data.samples import ExampleBuilder
    from src.data.stream import collate
    from src.model.vision import VisionConfig
    from src.training.telemetry import BatchCounts
    from tests.model.test_anyres import processor_for

    grids = ((64, 32), (32, 64), (64, 64))  # (width, height)
    clip = {"model_type": "clip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}  # fmt: skip
    vision = VisionConfig(type="hf", config=clip, image_mode="anyres", anyres_grids=[list(g) for g in grids])
    module = LlavaLitModule(str(demo_dir / "tokenizer"), vision=vision, llm=TINY["llm"])
    spec = module.data_spec()
    encoder = ConversationEncoder(spec.tokenizer, build_template("vicuna_v1", ""), spec.image_tokens)
    builder = ExampleBuilder(encoder, spec.image_transform, "caption", image_token_count=spec.image_token_count)
    sizes = [(96, 24), (90, 90), (40, 70)]
    examples = [builder({"caption": "a shape"}, [Image.new("RGB", size, (200, 0, 0))])[0] for size in sizes]
    batch = collate(examples, spec.pad_id)
    counts = BatchCounts.of(batch, module.image_token_id)

    processor = processor_for(32, 8, grids)
    expected = sum(processor._get_number_of_features(h, w, 32, 32) - 1 for w, h in sizes)  # CLS dropped
    assert counts.image_tokens == expected
    views = counts.images
    assert views == batch["pixel_values"].shape[0] == sum(spec.image_transform.views_for(*s) for s in sizes)
    assert counts.image_tokens < views * spec.image_tokens  # what views x tokens per view would have said
    features = module.model.image_features(batch["pixel_values"], batch["image_sizes"])
    assert features.shape[0] == counts.image_tokens  # the LLM runs these, among the batch's real tokens
    assert counts.tokens == int(batch["attention_mask"].sum())
    assert BatchCounts.of(batch).image_tokens == 0  # no placeholder id, nothing counted
