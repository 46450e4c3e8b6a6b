"""src.model.weights: LLaVA's own released files as `init_from`, against the official model.

The official `LlavaLlamaForCausalLM` (and its `build_vision_projector`) comes from the installed
`llava-torch` wheel, built at a tiny size with a tiny CLIP tower saved to a folder (LLaVA loads its
tower by path). Its state dict is written in the layouts LLaVA releases: a stage-1
`mm_projector.bin` (what `train.py` saves under --tune_mm_mlp_adapter) and a LLaVA-1.5 folder of
shards with an index. The kit's model loads them and must then hold every tensor and compute the
same features, logits and loss as the official model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from src.model.language import LLMConfig, build_llm, lm_logits
from src.model.llava import LlavaModel
from src.model.projector import ProjectorConfig, build_projector
from src.model.vision import VisionConfig, build_vision_tower
from src.model.weights import NotACheckpoint, check_init_from, load_parts, read_state

llava_llama = pytest.importorskip("llava.model.language_model.llava_llama")
builder = pytest.importorskip("llava.model.multimodal_projector.builder")

pytestmark = pytest.mark.usefixtures("single_thread")

CLIP = {"image_size": 32, "patch_size": 16, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3,
        "num_attention_heads": 2}  # fmt: skip
LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 2, "max_position_embeddings": 128}  # fmt: skip
VOCAB = 100  # LLaVA's rows: the base tokenizer's (its <image> is the id -200, not a row)
KIT_VOCAB = VOCAB + 1  # the kit's tokenizer adds <image>; its embeddings round that up to 128 rows
IMAGE_TOKEN = VOCAB  # the kit's <image> id
LLAVA_IMAGE_INDEX = -200  # llava.constants.IMAGE_TOKEN_INDEX
PROJECTOR_KEYS = ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                  "model.mm_projector.2.bias", "model.mm_projector.2.weight"]  # fmt: skip


def released_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The names LLaVA's released files carry. They were written under transformers 4, whose
    CLIPVisionModel nests its modules under `vision_model.`; transformers 5's has no such level."""
    tower = "model.vision_tower.vision_tower."
    return {
        (tower + "vision_model." + key.removeprefix(tower) if key.startswith(tower) else key): value
        for key, value in state.items()
    }


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> torch.nn.Module:
    """LLaVA-1.5's model class at a tiny size: mlp2x_gelu, the penultimate CLIP layer, patch features."""
    torch.manual_seed(0)
    tower_dir = tmp_path_factory.mktemp("clip")
    CLIPVisionModel(CLIPVisionConfig(**CLIP)).save_pretrained(tower_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tower_dir)
    config = llava_llama.LlavaConfig(
        vocab_size=VOCAB, **LLAMA, mm_vision_tower=str(tower_dir), mm_hidden_size=CLIP["hidden_size"],
        mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        mm_patch_merge_type="flat", image_aspect_ratio="pad",
    )  # fmt: skip
    model = llava_llama.LlavaLlamaForCausalLM(config)
    model.get_model().get_vision_tower().load_model()  # LLaVA builds its tower lazily, from the path
    with torch.no_grad():  # biases and norms away from their 0 / 1 defaults, so a mix-up shows
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def kit_model(projector: str = "mlp", depth: int = 2) -> LlavaModel:
    torch.manual_seed(1)
    vision = build_vision_tower(
        VisionConfig(
            type="hf", config={"model_type": "clip_vision_model", **CLIP}, feature_layer=-2, feature_select="patch"
        )  # fmt: skip
    )
    llm = build_llm(LLMConfig(config={"model_type": "llama", **LLAMA}), vocab_size=KIT_VOCAB)
    kwargs = {"depth": depth} if projector == "mlp" else {}
    proj = build_projector(
        ProjectorConfig(projector, kwargs), vision.hidden_size, LLAMA["hidden_size"], vision.grid,
        vision.num_prefix_tokens,
    )  # fmt: skip
    return LlavaModel(vision, proj, llm, IMAGE_TOKEN).eval()


def write_shards(state: dict[str, torch.Tensor], folder: Path, kind: str) -> Path:
    """transformers' sharded layout: two weight files and the index naming each key's file."""
    folder.mkdir()
    keys = sorted(state)
    halves = {f"{'pytorch_model' if kind == 'bin' else 'model'}-0000{i + 1}-of-00002.{kind}": part
              for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :]))}  # fmt: skip
    for name, part in halves.items():
        tensors = {key: state[key].detach().clone().contiguous() for key in part}
        torch.save(tensors, folder / name) if kind == "bin" else save_file(tensors, folder / name)
    index = "pytorch_model.bin.index.json" if kind == "bin" else "model.safetensors.index.json"
    weight_map = {key: name for name, part in halves.items() for key in part}
    (folder / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return folder


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two images and a prompt with one image each: LLaVA's ids (one -200) and the kit's (one
    placeholder per patch)."""
    torch.manual_seed(2)
    pixels = torch.randn(2, 3, CLIP["image_size"], CLIP["image_size"])
    text = torch.randint(3, VOCAB, (2, 9))
    patches = (CLIP["image_size"] // CLIP["patch_size"]) ** 2
    official_ids = torch.cat([text[:, :2], torch.full((2, 1), LLAVA_IMAGE_INDEX), text[:, 2:]], dim=1)
    kit_ids = torch.cat([text[:, :2], torch.full((2, patches), IMAGE_TOKEN), text[:, 2:]], dim=1)
    return pixels, official_ids, kit_ids


def test_a_stage1_mm_projector_bin_loads_into_the_mlp_projector(official, tmp_path: Path) -> None:
    """What LLaVA's pretrain.sh leaves (`mm_projector.bin`: the projector's parameters by their
    model names) is what stage 2 starts from; the kit's projector then maps features as LLaVA's."""
    state = {k: v.detach().clone() for k, v in official.named_parameters() if "mm_projector" in k}
    assert sorted(state) == PROJECTOR_KEYS
    torch.save(state, tmp_path / "mm_projector.bin")
    model = kit_model()
    assert load_parts(model, read_state(tmp_path / "mm_projector.bin")) == ["projector"]
    features = torch.randn(2, 4, CLIP["hidden_size"])
    torch.testing.assert_close(model.projector(features), official.get_model().mm_projector(features), rtol=0, atol=0)
    # and the module the official builder makes from the config, loaded from the same file
    rebuilt = builder.build_vision_projector(official.config)
    rebuilt.load_state_dict({k.removeprefix("model.mm_projector."): v for k, v in state.items()})
    torch.testing.assert_close(model.projector(features), rebuilt(features), rtol=0, atol=0)


def test_a_linear_mm_projector_loads_into_the_linear_projector(official, tmp_path: Path) -> None:
    config = official.config
    config_linear = type(config)(**{**config.to_dict(), "mm_projector_type": "linear"})
    official_linear = builder.build_vision_projector(config_linear)
    torch.save({f"model.mm_projector.{k}": v for k, v in official_linear.state_dict().items()}, tmp_path / "p.bin")
    model = kit_model("linear")
    assert load_parts(model, read_state(tmp_path / "p.bin")) == ["projector"]
    features = torch.randn(3, 4, CLIP["hidden_size"])
    torch.testing.assert_close(model.projector(features), official_linear(features), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["bin", "safetensors"])
def test_a_llava15_checkpoint_folder_loads_every_part_and_computes_as_llava(official, tmp_path: Path, kind) -> None:
    state = released_names(official.state_dict())
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", *PROJECTOR_KEYS} <= state.keys()
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight" in state
    folder = write_shards(state, tmp_path / "llava-v1.5-tiny", kind)
    check_init_from(folder)  # what the CLI checks when the config is read
    model = kit_model()
    assert load_parts(model, read_state(folder)) == ["vision", "projector", "llm"]

    # every tensor LLaVA's file holds is in the kit's model, but the layer the kit prunes (LLaVA runs
    # it and reads hidden_states[-2]); embeddings: LLaVA's rows, then the rows the kit adds
    own = model.state_dict()
    tower, llm = "model.vision_tower.vision_tower.vision_model.", "model."
    pruned = f"{tower}encoder.layers.2."
    for key, value in state.items():
        if key.startswith(pruned):
            continue
        if key.startswith(tower):
            ours = own["vision.model." + key.removeprefix(tower)]
        elif key.startswith("model.mm_projector."):
            ours = own["projector.layers." + key.removeprefix("model.mm_projector.")]
        elif key.startswith(llm):
            ours = own["llm.model." + key.removeprefix(llm)]
        else:
            ours = own["llm." + key]
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            assert ours.shape == (128, LLAMA["hidden_size"])
            torch.testing.assert_close(ours[VOCAB:], value.mean(0).expand(128 - VOCAB, -1), rtol=0, atol=0)
            ours = ours[:VOCAB]
        assert torch.equal(ours, value), key
    assert not any(k.startswith("vision.model.encoder.layers.2.") for k in own)

    # the same image features, logits and loss as the official model
    pixels, official_ids, kit_ids = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_images(pixels), official.encode_images(pixels), rtol=1e-5, atol=1e-6)
        labels = official_ids.clone()
        labels[:, :4] = -100  # two text tokens, the image, one more text token: unsupervised
        theirs = official(input_ids=official_ids, images=pixels, labels=labels)
        kit_labels = kit_ids.clone()
        kit_labels[:, :7] = -100  # the same tokens, with the image's 4 placeholders in place of -200
        ours = model(kit_ids, pixel_values=pixels, labels=kit_labels)
        logits = lm_logits(model.llm, ours.hidden_states)[..., :VOCAB]
    torch.testing.assert_close(logits, theirs.logits, rtol=1e-4, atol=1e-5)
    # LLaVA's loss over its rows; the kit's own loss also gives its <image> row (a token of its
    # tokenizer, never a target) a share of the softmax, so it differs by that row's probability
    llava_rows_loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), kit_labels[:, 1:].flatten())
    torch.testing.assert_close(llava_rows_loss, theirs.loss, rtol=1e-5, atol=1e-6)
    assert ours.loss > theirs.loss


def test_transformers5_names_of_the_tower_load_too(official, tmp_path: Path) -> None:
    """A folder written from the official model under transformers 5 (the tower's keys without
    `vision_model.`) loads the same tensors."""
    folder = write_shards(official.state_dict(), tmp_path / "flat", "safetensors")
    model = kit_model()
    assert load_parts(model, read_state(folder)) == ["vision", "projector", "llm"]
    embeddings = "model.vision_tower.vision_tower.embeddings.patch_embedding.weight"
    assert torch.equal(
        model.state_dict()["vision.model.embeddings.patch_embedding.weight"], official.state_dict()[embeddings]
    )


def test_derived_buffers_older_files_hold_are_ignored(official, tmp_path: Path) -> None:
    """transformers 4 saved CLIP's position_ids (and once Llama's rotary inv_freq) in the state dict."""
    state = released_names(official.state_dict())
    state["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(5)[None]
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert load_parts(kit_model(), read_state(tmp_path)) == ["vision", "projector", "llm"]


def test_a_mismatch_is_an_error_listing_the_keys_in_the_kits_names(official, tmp_path: Path) -> None:
    state = {k: v.detach().clone() for k, v in official.named_parameters() if "mm_projector" in k}
    torch.save(state, tmp_path / "mm_projector.bin")
    with pytest.raises(ValueError) as refused:  # depth 3 needs a third linear layer
        load_parts(kit_model(depth=3), read_state(tmp_path / "mm_projector.bin"))
    assert str(refused.value) == (
        "init_from: the weights do not fit this model's config; keys missing from parts ['projector']: "
        "['projector.layers.4.bias', 'projector.layers.4.weight']"
    )
    torch.save({**state, "model.mm_projector.0.weight": torch.zeros(32, 8)}, tmp_path / "narrow.bin")
    with pytest.raises(ValueError) as refused:
        load_parts(kit_model(), read_state(tmp_path / "narrow.bin"))
    assert str(refused.value) == (
        "init_from: the weights do not fit this model's config; shape mismatch: projector.layers.0.weight: "
        "file (32, 8), model (32, 16)"
    )
    torch.save({**state, "model.image_newline": torch.zeros(32)}, tmp_path / "next.bin")
    with pytest.raises(ValueError, match=r"keys this model does not have: \['model.image_newline'\]$"):
        load_parts(kit_model(), read_state(tmp_path / "next.bin"))


def test_llavas_tower_needs_a_transformers_clip_tower(official, tmp_path: Path) -> None:
    torch.save(released_names(official.state_dict()), tmp_path / "pytorch_model.bin")
    model = kit_model()
    model.vision = build_vision_tower(
        VisionConfig(name="vit_tiny_patch16_224", image_size=32, kwargs={"embed_dim": 16, "depth": 2, "num_heads": 2})
    )
    with pytest.raises(ValueError) as refused:
        load_parts(model, read_state(tmp_path))
    assert str(refused.value) == (
        "init_from: LLaVA's vision tower (keys model.vision_tower.vision_tower.*) is a transformers CLIPVisionModel; "
        "this model's tower is TimmVisionTower (use vision.type: hf with a CLIP config or hub id)"
    )


def test_a_folder_without_weights_or_with_a_foreign_shard_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as refused:
        read_state(tmp_path)
    assert str(refused.value) == (
        f"init_from: no weights in the folder {tmp_path}: it has none of ['model.safetensors.index.json', "
        "'pytorch_model.bin.index.json', 'model.safetensors', 'pytorch_model.bin']"
    )
    (tmp_path / "pytorch_model.bin").write_text("not weights\n")
    with pytest.raises(ValueError) as refused:
        check_init_from(tmp_path)
    assert str(refused.value) == (
        f"model.init_from: {tmp_path / 'pytorch_model.bin'} is not a weights shard: it is a text file"
    )


class _Payload:
    """Unpickling this creates a file: a stand-in for code an untrusted shard would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_shard_holding_code_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "release"
    folder.mkdir()
    torch.save({"model.norm.weight": torch.ones(2), "payload": _Payload(str(marker))}, folder / "pytorch_model.bin")
    with pytest.raises(NotACheckpoint) as refused:
        read_state(folder)
    assert str(refused.value) == (
        f"init_from: {folder / 'pytorch_model.bin'} is not a weights shard: it is a torch file holding Python "
        "objects (io.open) that no checkpoint holds (not loaded)"
    )
    assert not marker.exists()
