"""src.export / src.export_next: anyres models <-> transformers' LlavaNextForConditionalGeneration.

The exported folder is read by a fresh Python process that imports transformers and nothing of the
kit, as a user would (`AutoProcessor` with `backend="pil"`, `AutoModelForImageTextToText`); what it
computes on images of several sizes (pixels, placeholder counts, logits, greedy replies) must be
what the kit computes. The import side is checked on a folder the kit wrote and on one saved
straight from a `LlavaNextForConditionalGeneration` built here, with transformers' own outputs as
the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_export import CLIP, LLAMA, QWEN2, SIGLIP, make_module, noise_image

from src.data.conversation import IMAGE_TAG, ConversationEncoder, build_template
from src.export import NotExportable, chat_template_for, export, from_transformers, main
from src.model.projector import ProjectorConfig
from src.model.vision import VisionConfig
from src.training.module import LlavaLitModule

pytestmark = pytest.mark.usefixtures("single_thread")

GRIDS = [[64, 32], [32, 64], [64, 64], [96, 32], [32, 96]]  # [width, height]: LLaVA-NeXT's shapes for 32 px crops
ANYRES = {"image_mode": "anyres", "anyres_grids": GRIDS}
CASES = [  # (image sizes (width, height), question): one image each, then two of different canvases in one prompt
    ([(64, 48)], "what colour is the circle"),
    ([(150, 20)], "how many shapes are there"),
    ([(20, 150)], "what colour is the circle"),
    ([(30, 30)], "where is the square"),
    ([(17, 90), (101, 37)], "what colour is the circle"),
]

# What a transformers user writes: no import from the kit, nothing but the folder's files.
TRANSFORMERS_ONLY = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

folder, cases, out = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3]
torch.set_num_threads(1)
processor = AutoProcessor.from_pretrained(folder, backend="pil")  # PIL: the pixels the model was trained on
model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
results = {"model": type(model).__name__, "image_processor": type(processor.image_processor).__name__, "cases": []}
for case in cases:
    content = [{"type": "image"}] * len(case["images"]) + [{"type": "text", "text": case["question"]}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [Image.open(path).convert("RGB") for path in case["images"]]
    inputs = processor(images=images, text=text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs)  # every setting from the folder's generation_config.json
    results["cases"].append({"text": text, "input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"],
                             "image_sizes": inputs["image_sizes"], "logits": logits,
                             "reply": generated[0, inputs["input_ids"].shape[1]:]})
torch.save(results, out)
"""


def anyres_module(tokenizer_dir, vision=None, projector=None, llm=None, seed=0) -> LlavaLitModule:
    return make_module(tokenizer_dir, ANYRES | (vision or {}), projector, llm, seed=seed)


def run_transformers_only(folder: Path, tmp_path: Path) -> dict:
    cases = []
    for k, (sizes, question) in enumerate(CASES):
        paths = []
        for j, (width, height) in enumerate(sizes):
            path = tmp_path / f"case{k}-{j}.png"  # PNG: lossless, both sides read the same pixels
            noise_image(width, height, seed=10 * k + j).save(path)
            paths.append(str(path))
        cases.append({"images": paths, "question": question})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", TRANSFORMERS_ONLY, str(folder), str(tmp_path / "cases.json"), str(tmp_path / "out.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(tmp_path / "out.pt", weights_only=True)
    for case, spec in zip(results["cases"], cases, strict=True):
        case["images"] = spec["images"]
    return results


def kit_logits(module, input_ids, pixel_values, image_sizes) -> torch.Tensor:
    with torch.no_grad():
        out = module.model(input_ids, torch.ones_like(input_ids), pixel_values, image_sizes=image_sizes)
        return module.model.llm.get_output_embeddings()(out.hidden_states).float()


@pytest.mark.parametrize(
    ("vision", "projector", "llm"),
    [
        ({}, None, None),  # LLaVA-NeXT's own shape: CLIP, layer -2, patch features, mlp2x_gelu, Llama
        ({"config": dict(SIGLIP)}, {"name": "linear"}, {"config": dict(QWEN2)}),  # no CLS, a linear map, tied head
    ],
    ids=["clip-mlp2-llama", "siglip-linear-qwen2-tied"],
)
def test_transformers_alone_gives_the_kits_pixels_tokens_logits_and_replies(demo_dir, tmp_path, vision, projector, llm):
    from PIL import Image

    module = anyres_module(demo_dir / "tokenizer", vision, projector, llm)
    folder = export(module, tmp_path / "hf", template="vicuna_v1")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert config["image_grid_pinpoints"] == [[h, w] for w, h in GRIDS]  # transformers reads [height, width]
    assert config["image_seq_length"] == module.model.image_tokens == 16 and config["vision_feature_layer"] == -1
    results = run_transformers_only(folder, tmp_path)
    assert results["model"] == "LlavaNextForConditionalGeneration"
    assert results["image_processor"] == "LlavaNextImageProcessorPil"

    tokenizer, layout = module.tokenizer, module.model.anyres_layout
    transform = module.model.vision.image_transform()
    encoder = ConversationEncoder(tokenizer, build_template("vicuna_v1", None), module.model.image_tokens)
    eos = tokenizer.eos_token_id
    vocab = len(tokenizer)
    for case, (sizes, question) in zip(results["cases"], CASES, strict=True):
        images = [Image.open(path).convert("RGB") for path in case["images"]]
        # pixels: every view of every image, bit for bit (the processor pads images to the most views)
        pixels = [transform(image) for image in images]
        for k, ours in enumerate(pixels):
            assert torch.equal(case["pixel_values"][k, : len(ours)], ours), sizes[k]
        assert case["image_sizes"].tolist() == [[h, w] for w, h in sizes]
        # placeholders: the kit's count per image, and the kit's prompt ids
        value = "\n".join([IMAGE_TAG] * len(sizes) + [question])
        prompt = encoder.encode_prompt(
            [{"from": "human", "value": value}], len(sizes), [layout(w, h) for w, h in sizes]
        )
        assert case["text"] == prompt.text
        assert case["input_ids"][0].tolist() == prompt.input_ids
        ids = case["input_ids"]
        image_sizes = case["image_sizes"]
        ours = kit_logits(module, ids, torch.cat(pixels), image_sizes)
        assert (ours[..., :vocab] - case["logits"]).abs().max() <= 1e-4
        # greedy replies, token for token, with the folder's generation settings (eos from the tokenizer)
        settings = module.generation_settings()
        (reply,) = module.model.reply(ids, torch.tensor([ids.shape[1]]), torch.cat(pixels),
                                      settings["max_new_tokens"], eos, image_sizes=image_sizes)  # fmt: skip
        theirs = case["reply"].tolist()
        assert reply.tokens == [t for t in theirs if t != eos][: len(reply.tokens)]
        assert len(theirs) == len(reply.tokens) + (reply.finish == "eos")


def test_export_writes_the_processor_chat_template_and_generation_config(demo_dir, tmp_path):
    module = anyres_module(demo_dir / "tokenizer")
    folder = export(module, tmp_path / "hf", template="vicuna_v1", system_prompt="Be brief.")
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["processor_class"] == "LlavaNextProcessor"
    images = processor_config["image_processor"]
    assert images["image_grid_pinpoints"] == [[h, w] for w, h in GRIDS]
    assert images["size"] == {"shortest_edge": 32} and images["crop_size"] == {"height": 32, "width": 32}
    transform = module.model.vision.image_transform()
    assert (images["image_mean"], images["image_std"]) == (list(transform.mean), list(transform.std))
    assert processor_config["num_additional_image_tokens"] == 1 and processor_config["patch_size"] == 8
    generation = json.loads((folder / "generation_config.json").read_text())
    tokenizer = module.tokenizer
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)  # fmt: skip
    from transformers import AutoProcessor, AutoTokenizer

    saved = AutoTokenizer.from_pretrained(folder)
    template = chat_template_for("vicuna_v1", "Be brief.", tokenizer)
    assert saved.chat_template == AutoProcessor.from_pretrained(folder, backend="pil").chat_template == template
    assert saved.convert_tokens_to_ids(IMAGE_TAG) == module.image_token_id
    assert (saved.bos_token, saved.eos_token) == (tokenizer.bos_token, tokenizer.eos_token)


def test_a_token_count_per_size_equal_to_the_exported_processor(demo_dir, tmp_path):
    """Many sizes, portrait to landscape and tiny to large: the exported processor's placeholders per image
    are the kit's `AnyresLayout` count (its canvases, crop size and CLS handling all came through)."""
    from transformers import AutoProcessor

    module = anyres_module(demo_dir / "tokenizer")
    export(module, tmp_path / "hf")
    processor = AutoProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    layout = module.model.anyres_layout
    for width, height in [(1, 1), (3, 2), (2, 3), (32, 32), (33, 31), (640, 480), (1500, 200), (200, 1500),
                          (97, 33), (64, 32), (1000, 7), (7, 1000)]:  # fmt: skip
        out = processor(text=IMAGE_TAG, images=noise_image(width, height), return_tensors="pt")
        assert out["input_ids"][0].tolist().count(module.image_token_id) == layout(width, height), (width, height)


def test_import_round_trip_gives_the_exported_models_outputs(demo_dir, tmp_path):
    """export -> from-hf -> the kit: the same logits as the kit model it came from and as transformers."""
    from transformers import LlavaNextForConditionalGeneration

    source = anyres_module(demo_dir / "tokenizer", seed=3)
    export(source, tmp_path / "hf", template="vicuna_v1")
    assert main(["from-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    written = yaml.safe_load((tmp_path / "ours" / "model.yaml").read_text())
    vision = written["model"]["vision"]
    assert (vision["image_mode"], vision["anyres_merge"], vision["anyres_grids"]) == ("anyres", "unpad", GRIDS)
    assert (vision["feature_layer"], vision["feature_select"], vision["image_size"]) == (-1, "patch", 32)
    assert written["model"]["projector"] == {"name": "mlp", "kwargs": {"depth": 2}}
    assert written["data"] == {"template": "chat_template", "system_prompt": None}
    imported = imported_module(written)
    torch.testing.assert_close(
        imported.model.projector.anyres.image_newline, source.model.projector.anyres.image_newline
    )
    hf = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids, pixels, sizes = inputs_for(source, [(64, 48), (20, 150)])
    with torch.no_grad():
        theirs = hf(input_ids=ids, pixel_values=pixels, image_sizes=sizes).logits
    vocab = len(source.tokenizer)
    ours = kit_logits(imported, ids, pixels, sizes)[..., :vocab]
    assert (ours - theirs).abs().max() <= 1e-4
    assert (ours - kit_logits(source, ids, pixels, sizes)[..., :vocab]).abs().max() <= 1e-4


def imported_module(written: dict) -> LlavaLitModule:
    model = written["model"]
    module = LlavaLitModule(model["tokenizer"], vision=VisionConfig(**model["vision"]),
                            projector=ProjectorConfig(**model["projector"]), llm=model["llm"],
                            init_from=model["init_from"])  # fmt: skip
    module.configure_model()
    return module.eval()


def inputs_for(module, sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A row of words around the images' placeholders, the kit's pixels and the images' (height, width)."""
    transform, layout = module.model.vision.image_transform(), module.model.anyres_layout
    pieces = [torch.tensor([module.tokenizer.bos_token_id, 7, 8])]
    for width, height in sizes:
        pieces += [torch.full((layout(width, height),), module.image_token_id), torch.tensor([9, 10])]
    pixels = torch.cat([transform(noise_image(w, h, seed=w + h)) for w, h in sizes])
    return torch.cat(pieces)[None], pixels, torch.tensor([[h, w] for w, h in sizes])


def tiny_llava_next(folder: Path, tokenizer_dir: Path, feature_layer: int = -2) -> None:
    """A LlavaNext folder as transformers writes it (not the kit): a tiny model with its own processor."""
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vision = {k: v for k, v in CLIP.items() if k != "model_type"}
    text = {k: v for k, v in LLAMA.items() if k != "model_type"} | {"vocab_size": len(tokenizer)}
    pinpoints = [[h, w] for w, h in GRIDS]
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TAG), image_grid_pinpoints=pinpoints,
        vision_feature_layer=feature_layer, vision_feature_select_strategy="default", image_seq_length=16,
    )  # fmt: skip
    torch.manual_seed(5)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():  # random biases and norms, so a dropped or misplaced one shows
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    images = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                        image_grid_pinpoints=pinpoints)  # fmt: skip
    LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                       num_additional_image_tokens=1, image_token=IMAGE_TAG).save_pretrained(folder)  # fmt: skip


def test_import_of_a_folder_transformers_wrote_gives_transformers_logits(demo_dir, tmp_path):
    """A llava-hf-shaped LlavaNext (CLIP read at hidden_states[-2], so one layer more than the kit keeps):
    the kit's model from `from-hf` computes transformers' logits on the processor's own inputs."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    tiny_llava_next(tmp_path / "hf", demo_dir / "tokenizer")
    assert main(["from-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    written = yaml.safe_load((tmp_path / "ours" / "model.yaml").read_text())
    vision = written["model"]["vision"]
    assert (vision["image_mode"], vision["anyres_merge"], vision["anyres_grids"]) == ("anyres", "unpad", GRIDS)
    assert (vision["feature_layer"], vision["feature_select"], vision["config"]["num_hidden_layers"]) == (
        -2,
        "patch",
        3,
    )
    assert "data" not in written  # the folder has no chat template: the user's config says how to prompt
    imported = imported_module(written)
    assert imported.model.vision.layer == 1  # the layer after the one read is not kept (nor in weights.pt)
    hf = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    images = [noise_image(64, 48, seed=1), noise_image(20, 150, seed=2)]
    inputs = processor(images=images, text=f"{IMAGE_TAG} one {IMAGE_TAG} two", return_tensors="pt")
    with torch.no_grad():
        theirs = hf(**inputs).logits
    pixels = torch.cat([imported.model.vision.image_transform()(image) for image in images])
    ours = kit_logits(imported, inputs["input_ids"], pixels, inputs["image_sizes"])
    assert (ours[..., : theirs.shape[-1]] - theirs).abs().max() <= 1e-4
    _, state = from_transformers(tmp_path / "hf")
    assert set(state) == set(imported.model.state_dict())


def test_import_refuses_what_the_kit_cannot_hold(demo_dir, tmp_path):
    from transformers import AutoConfig

    tiny_llava_next(tmp_path / "hf", demo_dir / "tokenizer")
    config = AutoConfig.from_pretrained(tmp_path / "hf")
    config.vision_feature_select_strategy = "full"
    config.save_pretrained(tmp_path / "hf")
    with pytest.raises(NotExportable, match="vision_feature_select_strategy 'full' keeps CLIP's CLS token"):
        from_transformers(tmp_path / "hf")
    config.vision_feature_select_strategy = "default"
    config.vision_feature_layer = [-2, -1]
    config.save_pretrained(tmp_path / "hf")
    with pytest.raises(NotExportable, match=r"several feature layers \[-2, -1\] are not supported"):
        from_transformers(tmp_path / "hf")
