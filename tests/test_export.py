"""src.export: our model <-> transformers' LlavaForConditionalGeneration, with parity checks.

Every model is tiny and random; the folders are written to tmp_path and loaded back with
transformers' own `from_pretrained`, so what is tested is what vLLM or lmms-eval would read.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from src.cli import main as cli_main
from src.data.conversation import IGNORE_INDEX, IMAGE_TAG
from src.export import NotExportable, export, from_transformers, main, to_transformers
from src.model.projector import ProjectorConfig
from src.model.vision import VisionConfig
from src.training.module import LlavaLitModule

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]

LAYERS = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
CLIP = dict(model_type="clip_vision_model", image_size=32, patch_size=8, **LAYERS)  # 4x4 grid + CLS
SIGLIP = dict(model_type="siglip_vision_model", image_size=32, patch_size=8, **LAYERS)  # 4x4 grid
LLAMA = {"model_type": "llama", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip


def make_module(tokenizer_dir, vision=None, projector=None, llm=None, seed=0, **options) -> LlavaLitModule:
    torch.manual_seed(seed)
    module = LlavaLitModule(
        str(tokenizer_dir),
        vision=VisionConfig(**({"type": "hf", "config": dict(CLIP)} | (vision or {}))),
        projector=ProjectorConfig(**(projector or {"name": "mlp", "kwargs": {"depth": 2}})),
        llm={"config": dict(LLAMA)} | (llm or {}),
        **options,
    )
    module.configure_model()
    with torch.no_grad():  # random biases too, so a dropped or misplaced bias shows up
        for p in module.model.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.02)
    return module.eval()


def batch_for(module: LlavaLitModule) -> dict[str, torch.Tensor]:
    """Two rows: one with two images, one text-only and shorter (right-padded, masked)."""
    g = torch.Generator().manual_seed(1)
    image = torch.full((module.model.image_tokens,), module.image_token_id)
    assert module.image_token_id < 5  # the demo tokenizer's specials come first; words follow

    def words(n: int) -> torch.Tensor:
        return torch.randint(5, len(module.tokenizer), (n,), generator=g)

    first = torch.cat([words(2), image, words(3), image, words(2)])
    input_ids = torch.stack([first, words(first.shape[0])])
    mask = torch.ones_like(input_ids)
    mask[1, -5:] = 0
    labels = input_ids.clone()
    labels[input_ids == module.image_token_id] = IGNORE_INDEX
    labels[:, :3] = IGNORE_INDEX
    labels[mask == 0] = IGNORE_INDEX
    size = module.model.vision.input_size
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
            "pixel_values": torch.randn(2, 3, size, size, generator=g)}  # fmt: skip


def our_logits(module, batch) -> torch.Tensor:
    out = module.model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    return module.model.llm.get_output_embeddings()(out.hidden_states).float()


def exported(module, tmp_path: Path):
    from transformers import LlavaForConditionalGeneration

    export(module, tmp_path / "hf")
    return LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()


def assert_parity(module, hf, batch) -> None:
    with torch.no_grad():
        ours = our_logits(module, batch)
        theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"]).logits  # fmt: skip
    keep = batch["attention_mask"].bool()
    vocab = len(module.tokenizer)  # our rows past the tokenizer are padding, never produced, not exported
    assert theirs.shape[-1] == vocab
    assert (ours[..., :vocab] - theirs)[keep].abs().max() <= 1e-4


@pytest.mark.parametrize(
    ("vision", "projector"),
    [
        ({}, None),  # LLaVA-1.5: CLIP, layer -2, patch features, mlp2x_gelu
        ({"feature_select": "cls_patch", "feature_layer": -1}, {"name": "linear"}),
        ({"config": dict(SIGLIP)}, {"name": "mlp", "kwargs": {"depth": 1}}),
    ],
    ids=["clip-mlp2", "clip-cls-linear", "siglip-mlp1"],
)
def test_exported_model_loads_cleanly_and_gives_our_logits(demo_dir, tmp_path, vision, projector):
    from transformers import LlavaForConditionalGeneration

    module = make_module(demo_dir / "tokenizer", vision, projector)
    export(module, tmp_path / "hf")
    hf, info = LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, output_loading_info=True
    )
    assert {k: v for k, v in info.items() if v} == {}  # no missing, unexpected or mismatched keys
    assert hf.config.image_seq_length == module.model.image_tokens
    assert_parity(module, hf.eval(), batch_for(module))


def test_our_loss_equals_transformers_loss_on_the_same_weights_and_batch(demo_dir):
    module = make_module(demo_dir / "tokenizer")
    hf = to_transformers(module.model, module.image_token_id, len(module.tokenizer))
    batch = batch_for(module)
    with torch.no_grad():
        ours = module.model(**batch).loss
        theirs = hf(**batch).loss
    assert torch.isfinite(ours) and abs(float(ours) - float(theirs)) <= 1e-5 * abs(float(theirs))


def test_lora_is_merged_into_the_exported_weights(demo_dir, tmp_path):
    module = make_module(demo_dir / "tokenizer", freeze={"llm": "lora"}, llm={"lora": {"r": 4, "alpha": 8}})
    with torch.no_grad():  # a trained adapter: peft starts lora_B at zero, which would change nothing
        for name, p in module.model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = batch_for(module)
    with torch.no_grad():
        before = our_logits(module, batch)
    hf = exported(module, tmp_path)
    assert not any("lora" in k for k in hf.state_dict())
    assert_parity(module, hf, batch)  # module.llm is now the merged model ...
    with torch.no_grad():
        assert (our_logits(module, batch) - before).abs().max() <= 1e-4  # ... computing what the adapter did


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Every pixel independent: the hardest case for a resampler, so any difference in resizing shows."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
    return Image.fromarray(pixels.numpy())


@pytest.mark.parametrize("mode", ["pad", "resize", "resize_crop"])
def test_processor_makes_our_placeholders_and_pixels(demo_dir, tmp_path, mode):
    """The exported processor with its PIL image processor (`backend="pil"`, as the docs say to load it):
    the kit's pixels bit for bit on noise images of several sizes, and its placeholders."""
    from transformers import AutoProcessor

    module = make_module(demo_dir / "tokenizer", {"image_mode": mode})
    export(module, tmp_path / "hf")
    processor = AutoProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    assert type(processor.image_processor).__name__ == "LlavaImageProcessorPil"
    transform = module.model.vision.image_transform()
    text = f"{IMAGE_TAG}\nwhat colour is the circle"
    for k, (width, height) in enumerate([(48, 24), (24, 48), (32, 32), (101, 37), (7, 5), (640, 427)]):
        image = noise_image(width, height, seed=k)
        out = processor(text=text, images=image, return_tensors="pt")
        ours = transform(image)
        assert out["pixel_values"].shape == ours.shape == (1, 3, 32, 32)
        assert torch.equal(out["pixel_values"], ours), (mode, width, height)
        ids = out["input_ids"][0].tolist()
        assert ids.count(module.image_token_id) == module.model.image_tokens
    plain = module.tokenizer(text.replace(IMAGE_TAG, ""), add_special_tokens=False)["input_ids"]
    assert [t for t in ids if t != module.image_token_id][-len(plain) :] == plain


def test_auto_processor_without_backend_picks_torchvision_whose_pixels_differ(demo_dir, tmp_path):
    """Why the docs say `backend="pil"`: transformers 5 loads the torchvision backend by default, whatever the
    folder's files say, and its resize is not PIL's."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        pytest.skip("torchvision is not installed: AutoProcessor can only pick the PIL backend")
    module = make_module(demo_dir / "tokenizer", {"image_mode": "pad"})
    export(module, tmp_path / "hf")
    default = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert type(default.image_processor).__name__ == "LlavaImageProcessor"  # the torchvision backend
    image = noise_image(101, 37)
    pixels = default(text=IMAGE_TAG, images=image, return_tensors="pt")["pixel_values"]
    assert not torch.equal(pixels, module.model.vision.image_transform()(image))


@pytest.mark.parametrize(
    ("vision", "projector", "message"),
    [
        ({"type": "timm", "config": {}, "name": "vit_tiny_patch16_224", "image_size": 32,
          "kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}},
         None, "vision: TimmVisionTower does not map onto transformers' Llava"),
        ({"config": {"model_type": "dinov2", "image_size": 32, "patch_size": 8, "mlp_ratio": 2, "hidden_size": 32,
                     "num_hidden_layers": 2, "num_attention_heads": 2}},
         None, "vision: a transformers 'dinov2' tower does not map onto transformers' Llava"),
        ({}, {"name": "pixel_shuffle"}, "projector: PixelShuffleProjector does not map onto transformers' Llava"),
        ({}, {"name": "mlp", "kwargs": {"depth": 3}}, "projector: mlp of depth 3 does not map"),
        ({"image_mode": "anyres", "anyres_merge": "flat"}, None,
         "vision: anyres_merge 'flat' has no transformers LlavaNext equivalent: LlavaNext always merges"),
        ({"image_size": 48}, None, "vision: the kit runs this CLIP tower at 48 px (vision.image_size), interpolating "
         "position embeddings made for 32 px; transformers' Llava runs it at its config's 32 px"),
        ({"image_mode": "anyres", "image_size": 48, "anyres_grids": [[96, 48], [48, 96]]}, None,
         "vision: the kit runs this CLIP tower at 48 px (vision.image_size), interpolating position embeddings made "
         "for 32 px; transformers' LlavaNext runs it"),
        ({"image_mode": "anyres"}, {"name": "pixel_shuffle"}, "projector: PixelShuffleProjector does not map onto "
         "transformers' LlavaNext"),
    ],
    ids=["timm", "dinov2", "pixel_shuffle", "mlp3", "anyres-flat", "resized-tower", "anyres-resized-tower",
         "anyres-pixel_shuffle"],
)  # fmt: skip
def test_parts_that_do_not_map_stop_the_export_and_say_which(demo_dir, tmp_path, vision, projector, message):
    module = make_module(demo_dir / "tokenizer", vision, projector)
    with pytest.raises(NotExportable) as info:
        export(module, tmp_path / "hf")
    assert str(info.value).startswith(message)
    assert not (tmp_path / "hf").exists()


QWEN2 = {"model_type": "qwen2", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}  # fmt: skip


@pytest.mark.parametrize(
    ("vision", "llm", "mode"),
    [
        ({}, None, "resize"),
        ({"config": dict(SIGLIP), "image_mode": "resize_crop"}, {"config": dict(QWEN2)}, "resize_crop"),
    ],
    ids=["clip-llama", "siglip-qwen2-tied"],
)
def test_import_gives_a_config_and_weights_that_reproduce_the_transformers_model(
    demo_dir, tmp_path, capsys, vision, llm, mode
):
    from transformers import LlavaForConditionalGeneration

    source = make_module(demo_dir / "tokenizer", vision, llm=llm, seed=3)
    export(source, tmp_path / "hf")
    assert main(["from-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    config = yaml.safe_load((tmp_path / "ours" / "model.yaml").read_text())["model"]
    assert config["vision"]["feature_layer"] == -1 and config["vision"]["feature_select"] == "patch"
    assert config["vision"]["image_mode"] == mode and config["vision"]["image_size"] == 32
    imported = LlavaLitModule(
        config["tokenizer"],
        vision=VisionConfig(**config["vision"]),
        projector=ProjectorConfig(**config["projector"]),
        llm=config["llm"],
        init_from=config["init_from"],
    )
    imported.configure_model()
    imported.eval()
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert_parity(imported, hf, batch_for(source))
    _, state = from_transformers(tmp_path / "hf")
    assert set(state) == set(imported.model.state_dict())
    # merged after the demo config, model.yaml replaces the whole model section
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(ROOT / "lightning_config.yaml"), "--config",
                  str(tmp_path / "ours" / "model.yaml"), "--print_config"])  # fmt: skip
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)["model"]
    assert printed["vision"] == config["vision"] and printed["init_from"] == config["init_from"]
    assert printed["llm"]["config"] == config["llm"]["config"] and printed["llm"]["name"] is None
    transform, original = imported.model.vision.image_transform(), source.model.vision.image_transform()
    assert (transform.mode, transform.size, transform.mean, transform.std) == (
        original.mode, original.size, original.mean, original.std)  # fmt: skip


def test_init_from_with_wrong_shapes_or_keys_is_a_clear_error(demo_dir, tmp_path):
    module = make_module(demo_dir / "tokenizer")
    state = module.model.state_dict()
    state["projector.layers.0.weight"] = state["projector.layers.0.weight"][:, :3]
    del state["projector.layers.2.bias"]
    torch.save(state, tmp_path / "bad.pt")
    other = LlavaLitModule(str(demo_dir / "tokenizer"), vision=VisionConfig(type="hf", config=dict(CLIP)),
                           llm={"config": dict(LLAMA)}, init_from=str(tmp_path / "bad.pt"))  # fmt: skip
    with pytest.raises(ValueError) as info:
        other.configure_model()
    message = str(info.value)
    assert "projector.layers.2.bias" in message and "missing" in message
    assert "projector.layers.0.weight" in message and "(48, 3)" in message and "(48, 32)" in message


def test_export_cli_from_a_lightning_checkpoint(demo_dir, tmp_path):
    from lightning.pytorch import Trainer
    from transformers import LlavaForConditionalGeneration

    module = make_module(demo_dir / "tokenizer")
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, max_epochs=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    assert main(["to-hf", "--ckpt", str(tmp_path / "m.ckpt"), "--out", str(tmp_path / "hf")]) == 0
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert_parity(module, hf, batch_for(module))


def test_import_of_a_llava_folder_transformers_wrote_reading_layer_minus_2(demo_dir, tmp_path):
    """llava-hf's shape: CLIP read at hidden_states[-2], so the folder holds one tower layer more than the kit
    keeps; the import leaves it out (init_from would refuse it) and gives transformers' logits."""
    from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "tokenizer")
    vision = {k: v for k, v in CLIP.items() if k != "model_type"}
    text = {k: v for k, v in LLAMA.items() if k != "model_type"} | {"vocab_size": len(tokenizer)}
    config = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TAG), image_seq_length=16,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")  # fmt: skip
    torch.manual_seed(4)
    hf = LlavaForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    assert main(["from-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    model = yaml.safe_load((tmp_path / "ours" / "model.yaml").read_text())["model"]
    assert model["vision"]["feature_layer"] == -2
    imported = LlavaLitModule(model["tokenizer"], vision=VisionConfig(**model["vision"]),
                              projector=ProjectorConfig(**model["projector"]), llm=model["llm"],
                              init_from=model["init_from"])  # fmt: skip
    imported.configure_model()
    assert imported.model.vision.layer == 1
    assert_parity(imported.eval(), hf, batch_for(imported))
