"""The recipes under experiments/: every one parses through the CLI and builds its real model.

Hub ids cannot be downloaded here, so the build reads the real models' `config.json` (and the
towers' `preprocessor_config.json`) from tests/fixtures/hub/<hub id>/ and builds them on the
meta device: real architectures, no weights, no memory, a few seconds. A misspelt key, a
projector that does not fit its tower, a hub id without a fixture, a global batch that does
not add up or a stage 2 that cannot load what its stage 1 writes fails here, not on a cluster.
A slow test then runs the 7B two-stage sequence as written on CPU processes with tiny parts.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM

from src.cli import main
from src.core.config_files import config_chain
from src.data.datamodule import LlavaDataModule
from src.training import module as module_file
from src.training.module import LlavaLitModule
from src.training.stage import OptimizerConfig, kept_in_checkpoint, parameter_groups, warmup_steps_for

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
HUB = ROOT / "tests/fixtures/hub"
DEMO_TOKENIZER = str(ROOT / "data_shards/demo/tokenizer")
FSDP2 = "src.training.sharding.FSDP2Strategy"
CLIP = "openai/clip-vit-large-patch14-336"
SIGLIP = "google/siglip-so400m-patch14-384"
VICUNA_7B = "lmsys/vicuna-7b-v1.5"
VICUNA_13B = "lmsys/vicuna-13b-v1.5"
QWEN_05B = "Qwen/Qwen2.5-0.5B-Instruct"
LCS_558K = 558_128  # records in blip_laion_cc_sbu_558k.json
MIX_665K = 665_298  # records in llava_v1_5_mix665k.json


@dataclass(frozen=True)
class Spec:
    """What a recipe must be, from the paper / the brief, checked against what it says."""

    tower: str
    llm: str
    modes: tuple[str, str, str]  # freeze: vision, projector, llm
    lr: dict[str, float]  # peak learning rate per trained part
    global_batch: int
    samples: int
    template: str
    image_tokens: int
    tower_params: tuple[float, float]
    llm_params: tuple[float, float]
    stage1: str | None = None  # the recipe whose result init_from loads
    sharded: bool = False  # FSDP2 through FSDP2Strategy (a ModelParallelStrategy)
    max_length: int = 2048
    image_mode: str = "pad"
    anyres: tuple[tuple[int, int], ...] = ()  # anyres canvases [width, height], merged `unpad`


def _llava15(size: str, llm: str, llm_params: tuple[float, float]) -> dict[str, Spec]:
    common = dict(tower=CLIP, llm=llm, image_tokens=576, tower_params=(0.28e9, 0.30e9), llm_params=llm_params)
    stage1 = f"llava15_{size}/stage1_align"
    return {
        stage1: Spec(modes=("frozen", "full", "frozen"), lr={"projector": 1e-3}, global_batch=256,
                     samples=LCS_558K, template="plain", **common),
        f"llava15_{size}/stage2_finetune": Spec(
            modes=("frozen", "full", "full"), lr={"projector": 2e-5, "llm": 2e-5}, global_batch=128,
            samples=MIX_665K, template="vicuna_v1", stage1=stage1, sharded=True, **common),
        f"llava15_{size}/stage2_lora": Spec(
            modes=("frozen", "full", "lora"), lr={"projector": 2e-5, "llm": 2e-4}, global_batch=128,
            samples=MIX_665K, template="vicuna_v1", stage1=stage1, **common),
    }  # fmt: skip


LLAVA_NEXT_GRIDS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))  # --image_grid_pinpoints, in order


def _llava_next(size: str, llm: str, llm_params: tuple[float, float]) -> dict[str, Spec]:
    """LLaVA-NeXT: anyres + unpad with its pinpoints, max length 4096; stage 2 trains the tower too."""
    common = dict(
        tower=CLIP,
        llm=llm,
        image_tokens=576,
        tower_params=(0.28e9, 0.30e9),
        llm_params=llm_params,
        max_length=4096,
        image_mode="anyres",
        anyres=LLAVA_NEXT_GRIDS,
    )
    stage1 = f"llava_next_{size}/stage1_align"
    return {
        stage1: Spec(modes=("frozen", "full", "frozen"), lr={"projector": 1e-3}, global_batch=256,
                     samples=LCS_558K, template="plain", **common),
        f"llava_next_{size}/stage2_finetune": Spec(
            modes=("full", "full", "full"), lr={"projector": 2e-5, "llm": 2e-5, "vision": 2e-6}, global_batch=128,
            samples=None, template="vicuna_v1", stage1=stage1, sharded=True, **common),
    }  # fmt: skip


SPECS: dict[str, Spec] = {
    **_llava15("7b", VICUNA_7B, (6.7e9, 6.8e9)),  # Llama-2-7B: 6.74e9
    **_llava_next("7b", VICUNA_7B, (6.7e9, 6.8e9)),
    **_llava15("13b", VICUNA_13B, (12.9e9, 13.1e9)),  # Llama-2-13B: 13.02e9
    "small/siglip_qwen05b": Spec(
        tower=SIGLIP,
        llm=QWEN_05B,
        modes=("frozen", "full", "full"),
        lr={"projector": 2e-5, "llm": 2e-5},
        global_batch=128,
        samples=MIX_665K,
        template="chat_template",
        image_tokens=729,
        tower_params=(0.40e9, 0.42e9),
        llm_params=(0.49e9, 0.50e9),
    ),
}
NOT_TRAINING = {  # their own tests load them
    "sweeps",  # sweep specs: tests/launch
    "instruct",  # teacher settings for python -m src.instruct: tests/instruct
    "eval",  # judge settings: tests/eval
    "demo",  # CPU demo variants: tests/test_export_demo.py
    "llava15",  # parts of the LLaVA-1.5 recipes (a shared base, one overlay per stage): see parts_of
}
RECIPES = sorted(  # training configs
    str(p.relative_to(EXPERIMENTS).with_suffix(""))
    for p in EXPERIMENTS.rglob("*.yaml")
    if not NOT_TRAINING & set(p.relative_to(EXPERIMENTS).parts)
)


def test_every_recipe_has_a_spec_and_every_spec_a_recipe() -> None:
    assert RECIPES == sorted(SPECS)


LLAVA15_PARTS = EXPERIMENTS / "llava15"


def configs_of(recipe: str) -> list[Path]:
    """The `--config` files a recipe runs with: its own file, which names what it builds on in `base:`."""
    return [EXPERIMENTS / f"{recipe}.yaml"]


def parts_of(recipe: str) -> list[Path]:
    """The files a recipe is merged from, in order. A LLaVA-1.5 recipe is composed: the base all six share,
    its stage's overlay (shared by 7B and 13B), then its own file (size, run folder, checkpoints)."""
    own = EXPERIMENTS / f"{recipe}.yaml"
    if recipe.startswith("llava15_"):
        return [LLAVA15_PARTS / "base.yaml", LLAVA15_PARTS / own.name, own]
    return [own]


def config_args(configs: list[Path]) -> list[str]:
    return [arg for path in configs for arg in ("--config", str(path))]


@functools.cache
def resolved(configs: tuple[Path, ...]) -> dict:
    """The config `fit --config ... --print_config` prints, merged and resolved (the CLI exits 0 after it)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["fit", *config_args(list(configs)), "--print_config"])
    assert exit_info.value.code in (0, None), out.getvalue()[-2000:]
    return yaml.safe_load(out.getvalue())


def parsed(recipe: str) -> dict:
    """A recipe's resolved config, as its documented command gives it."""
    return resolved(tuple(configs_of(recipe)))


# ---- the LLaVA-1.5 recipes are composed, and resolve exactly as the six whole files did -------------
BEFORE = ROOT / "tests/fixtures/recipes"  # the recipes as whole files, before they were composed
COMPOSED = sorted(str(p.relative_to(BEFORE).with_suffix("")) for p in BEFORE.rglob("*.yaml"))


def test_the_composed_recipes_are_the_llava15_ones() -> None:
    assert COMPOSED == [r for r in RECIPES if r.startswith("llava15_")] and len(COMPOSED) == 6


@pytest.mark.parametrize("recipe", COMPOSED)
def test_composed_recipe_resolves_as_the_whole_file_did(recipe: str) -> None:
    """Every key of the resolved config (the CLI's defaults included), from the recipe's one file, equal to
    what the whole file, kept as a fixture, resolves to now: the composition changed where values are
    written, not one value."""
    assert parsed(recipe) == resolved((BEFORE / f"{recipe}.yaml",))


@pytest.mark.parametrize("recipe", COMPOSED)
def test_a_recipes_base_names_its_parts_in_order(recipe: str) -> None:
    assert [part.path.resolve() for part in config_chain(EXPERIMENTS / f"{recipe}.yaml")] == parts_of(recipe)


@pytest.mark.parametrize("recipe", COMPOSED)
def test_the_three_files_as_three_config_flags_resolve_as_the_one_file(recipe: str) -> None:
    """The command the recipes took before `base:` still works: the same config (the size file's own
    `base:` merges the two parts again before it, which changes nothing)."""
    assert resolved(tuple(parts_of(recipe))) == parsed(recipe)


def documented_command(recipe: str) -> list[str]:
    """The `--config` files of the last `python -m src.cli fit` command in the recipe's header comment."""
    header = []
    for line in (EXPERIMENTS / f"{recipe}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("# ").rstrip("\\ "))
    commands = " ".join(header).split("python -m src.cli fit")
    words = commands[-1].split()
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word == "--config"]


@pytest.mark.parametrize("recipe", COMPOSED)
def test_each_recipe_documents_the_command_the_tests_run(recipe: str) -> None:
    assert documented_command(recipe) == [str(p.relative_to(ROOT)) for p in configs_of(recipe)]


def _keys(tree: dict, prefix: str = "") -> set[str]:
    """The dotted keys a YAML file sets (a list is one value)."""
    return {
        key
        for name, value in tree.items()
        for key in (_keys(value, f"{prefix}{name}.") if isinstance(value, dict) else {f"{prefix}{name}"})
    }


@pytest.mark.parametrize("recipe", COMPOSED)
def test_each_value_of_a_recipe_is_written_in_one_of_its_files(recipe: str) -> None:
    """A later file that set a key again would hide a change made in the earlier one."""
    written = [_keys(yaml.safe_load(path.read_text())) - {"base"} for path in parts_of(recipe)]
    for i, earlier in enumerate(written):
        for later in written[i + 1 :]:
            assert not earlier & later


def test_both_stage2_overlays_read_the_same_data() -> None:
    """The one setting the two stage-2 overlays repeat (each is a whole stage): kept equal here."""
    finetune, lora = (
        yaml.safe_load((LLAVA15_PARTS / f"{name}.yaml").read_text())["data"]
        for name in ("stage2_finetune", "stage2_lora")
    )
    assert finetune == lora


def fixture_dir(hub_id: str) -> Path:
    path = HUB / hub_id
    assert (path / "config.json").is_file(), (
        f"no fixture for hub id {hub_id!r}: a typo, or add tests/fixtures/hub/{hub_id}"
    )
    return path


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_parses_with_its_hub_ids(recipe: str) -> None:
    config, spec = parsed(recipe), SPECS[recipe]
    model = config["model"]
    assert model["vision"]["name"] == spec.tower and model["llm"]["name"] == spec.llm
    assert model["tokenizer"] == spec.llm  # the LLM's own tokenizer
    for hub_id in (model["tokenizer"], model["vision"]["name"], model["llm"]["name"]):
        fixture_dir(hub_id)
    assert config["data"]["template"] == spec.template


@pytest.mark.parametrize("recipe", RECIPES)
def test_global_batch_and_epoch_add_up(recipe: str) -> None:
    config, spec = parsed(recipe), SPECS[recipe]
    trainer, data = config["trainer"], config["data"]
    world = int(trainer["devices"]) * int(trainer["num_nodes"])
    # data.global_batch_size sets the accumulation at start: global / (batch_size x devices x nodes)
    assert data["global_batch_size"] == spec.global_batch and trainer["accumulate_grad_batches"] == 1
    assert spec.global_batch % (data["batch_size"] * world) == 0
    assert data["samples_per_epoch"] == spec.samples and trainer["max_epochs"] == 1
    assert trainer["precision"] == "bf16-mixed" and data["max_length"] == spec.max_length
    strategy = trainer["strategy"]
    if spec.sharded:
        assert strategy["class_path"] == FSDP2  # every process one data-parallel rank, on any cluster
        assert strategy["init_args"].get("tensor_parallel_size", 1) == 1  # the data stream splits by global rank
    else:
        assert strategy in (("ddp",) if world > 1 else ("auto", "ddp"))


def _final_checkpoint(config: dict) -> str:
    """Where a recipe's run leaves its result: the ModelCheckpoint saving `final` at the epoch end."""
    (final,) = [
        c["init_args"] for c in config["trainer"]["callbacks"]
        if c["class_path"].endswith("ModelCheckpoint") and c["init_args"].get("filename") == "final"
    ]  # fmt: skip
    assert final["every_n_epochs"] == 1 and final["save_on_train_epoch_end"] and not final["enable_version_counter"]
    return f"{final['dirpath']}/final.ckpt"


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_result_is_saved_at_the_end_and_stage2_starts_from_stage1s(recipe: str) -> None:
    config, spec = parsed(recipe), SPECS[recipe]
    _final_checkpoint(config)
    if spec.stage1 is not None:
        assert config["model"]["init_from"] == _final_checkpoint(parsed(spec.stage1))
    else:
        assert config["model"]["init_from"] is None


# ---- the model, built on the meta device from the real configs --------------------------------
def _from_config(name, config=None, attn_implementation=None, dtype=None, **_):
    """AutoModelForCausalLM.from_pretrained without weights: the architecture of `name`'s config."""
    assert Path(name).is_relative_to(HUB), f"{name} would be downloaded"
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)


def build(recipe: str, monkeypatch: pytest.MonkeyPatch, init_state: dict | None = None) -> LlavaLitModule:
    """The recipe's LlavaLitModule with its model built on the meta device.

    Changed from the recipe, and only so: hub ids point at the fixture configs, the tower is built
    from its config instead of loading weights (`pretrained: false`), the LLM likewise, the
    tokenizer is the demo one (the real ones cannot be downloaded; the LLM keeps its own
    vocabulary rows), and `init_from` reads `init_state` instead of a checkpoint file.
    """
    model = dict(parsed(recipe)["model"])
    model["tokenizer"] = DEMO_TOKENIZER
    model["vision"] = {**model["vision"], "name": str(fixture_dir(model["vision"]["name"])), "pretrained": False}
    model["llm"] = {**model["llm"], "name": str(fixture_dir(model["llm"]["name"]))}
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", _from_config)
    if model["init_from"] is not None:
        assert init_state is not None, f"{recipe} has init_from but the test gave it no state"
        expected = model["init_from"]

        def read_state(path: str) -> dict:
            assert path == expected
            return init_state

        monkeypatch.setattr(module_file, "read_state", read_state)
    module = LlavaLitModule(**model)
    with torch.device("meta"):
        module.configure_model()
    return module


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_parameters(llm_config, r: int) -> int:
    """A rank-r adapter on every linear layer of a Llama / Qwen2 decoder: r x (in + out) each."""
    h, i = llm_config.hidden_size, llm_config.intermediate_size
    kv = llm_config.num_key_value_heads * (h // llm_config.num_attention_heads)
    per_layer = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h)  # q, k, v, o, gate, up, down
    return r * per_layer * llm_config.num_hidden_layers


def stage1_checkpoint(recipe: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """What the stage-1 recipe's checkpoint holds, as meta tensors: its trained parts only
    (in the real run the tower and the LLM come from the hub, so they are rebuilt, not saved)."""
    with monkeypatch.context() as patch:
        model = build(recipe, patch).model
    state = model.state_dict()
    return {key: state[key] for key in kept_in_checkpoint(model, {"vision", "llm"})}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_builds_its_model_on_the_meta_device(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = SPECS[recipe]
    init_state = stage1_checkpoint(spec.stage1, monkeypatch) if spec.stage1 else None
    if init_state is not None:
        assert init_state and all(key.startswith("projector.") for key in init_state)  # megabytes, not the LLM
    module = build(recipe, monkeypatch, init_state)
    model = module.model
    assert all(p.is_meta for p in model.parameters())
    if spec.stage1:
        assert module.init_parts == {"projector"}

    # the parts: the real architectures, at their real sizes
    llm_config = AutoConfig.from_pretrained(fixture_dir(spec.llm))
    tower_in, llm_width = model.vision.hidden_size, llm_config.hidden_size
    assert model.image_tokens == spec.image_tokens == model.vision.grid[0] * model.vision.grid[1]
    assert spec.tower_params[0] < _count(model.vision) < spec.tower_params[1]
    assert model.vision.layer == model.vision.full_depth - 2  # the penultimate layer, the last one pruned
    newline = llm_width if spec.anyres else 0  # LLaVA-NeXT's image_newline, a parameter of the projector
    assert _count(model.projector) == tower_in * llm_width + llm_width + llm_width * llm_width + llm_width + newline
    adapter = sum(p.numel() for name, p in model.llm.named_parameters() if "lora_" in name)
    assert spec.llm_params[0] < _count(model.llm) - adapter < spec.llm_params[1]
    transform = model.vision.image_transform()
    assert transform.mode == spec.image_mode and transform.size == {CLIP: 336, SIGLIP: 384}[spec.tower]

    # what trains, and at what learning rate
    freeze = module.freeze_config
    assert (freeze.vision, freeze.projector, freeze.llm) == spec.modes
    counts = module.parameter_counts()
    unused = sum(p.numel() for p in model.vision.unused_parameters())  # CLIP's post norm: it never runs
    assert counts["vision"][0] == {"frozen": 0, "full": counts["vision"][1] - unused}[freeze.vision]  # NeXT trains it
    assert counts["projector"][0] == counts["projector"][1]  # and trains the projector
    if freeze.llm == "lora":
        settings = module.llm_config.lora
        assert (settings.r, settings.alpha, settings.target_modules) == (128, 256, "all-linear")
        assert counts["llm"][0] == adapter == lora_parameters(llm_config, settings.r)
    else:
        assert counts["llm"][0] == {"frozen": 0, "full": counts["llm"][1]}[freeze.llm] and adapter == 0
    # a checkpoint keeps everything that trains (the hub parts' frozen weights are rebuilt instead)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and trained <= kept_in_checkpoint(model, {"vision", "llm"})
    groups = parameter_groups(model, module.optimizer_config)
    assert {g["name"].split("/")[0]: g["lr"] for g in groups} == spec.lr
    assert all(g["weight_decay"] == 0.0 for g in groups)


def test_the_llava15_parts_have_the_papers_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The brief's numbers, spelled out once: 576 tokens, and 1024 -> 4096 mlp2 for 7B."""
    model = build("llava15_7b/stage1_align", monkeypatch, None).model
    assert model.vision.grid == (24, 24) and model.image_tokens == 576
    assert _count(model.projector) == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert 6.6e9 < _count(model.llm) < 6.8e9 and 0.28e9 < _count(model.vision) < 0.31e9


# What LLaVA's own scripts pass (haotian-liu/LLaVA scripts/v1_5/pretrain.sh, finetune.sh, finetune_lora.sh;
# the same for 13B), as values: tests cannot fetch them. All three: 8 GPUs, --gradient_accumulation_steps 1,
# --num_train_epochs 1, --weight_decay 0., --warmup_ratio 0.03, --lr_scheduler_type cosine, --model_max_length
# 2048. Gradient clipping: none. The scripts run under DeepSpeed (--deepspeed ./scripts/zero2.json for stage 1,
# zero3.json for stage 2), whose JSON holds no "gradient_clipping" key, so DeepSpeed's default 0.0 (off) holds;
# the HF Trainer fills gradient_clipping from max_grad_norm only where the JSON says "auto", and accelerate's
# clip_grad_norm_ does nothing under DeepSpeed.
LLAVA_SCRIPTS = {  # stage -> (--per_device_train_batch_size, --learning_rate, --mm_projector_lr)
    "stage1_align": (32, 1e-3, None),
    "stage2_finetune": (16, 2e-5, None),
    "stage2_lora": (16, 2e-4, 2e-5),
}
HF_TRAINER_STEPS = {LCS_558K: (2181, 66), MIX_665K: (5198, 156)}  # tests/training/test_lr_schedule.py derives them


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.startswith("llava15_")])
def test_llava15_recipes_train_as_llavas_scripts(recipe: str) -> None:
    config, spec = parsed(recipe), SPECS[recipe]
    trainer, data, optimizer = config["trainer"], config["data"], config["model"]["optimizer"]
    per_device, lr, projector_lr = LLAVA_SCRIPTS[recipe.split("/")[1]]
    assert trainer["gradient_clip_val"] is None  # LLaVA trains without clipping (zero2.json / zero3.json)
    assert (trainer["devices"], trainer["num_nodes"], data["batch_size"]) == (8, 1, per_device)
    assert optimizer["lr"] == lr and optimizer["part_lr"] == ({"projector": projector_lr} if projector_lr else {})
    assert (optimizer["weight_decay"], optimizer["warmup_ratio"], optimizer["warmup_steps"]) == (0.0, 0.03, None)
    assert optimizer["min_lr_ratio"] == 0.0 and tuple(optimizer["betas"]) == (0.9, 0.999)
    # the schedule: whole global batches (one step fewer than the HF Trainer's), the same warm-up
    steps = spec.samples // spec.global_batch
    hf_steps, hf_warmup = HF_TRAINER_STEPS[spec.samples]
    assert steps == hf_steps - 1
    assert warmup_steps_for(OptimizerConfig(**optimizer), steps) == hf_warmup


# ---- the data settings read LLaVA's own records ---------------------------------------------
LCS_RECORD = {  # blip_laion_cc_sbu_558k.json's layout (a caption in demo-tokenizer words)
    "id": "004539375",
    "image": "00453/004539375.jpg",
    "conversations": [
        {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
        {"from": "gpt", "value": "a red circle above a blue square"},
    ],
}
MIX_RECORD = {  # llava_v1_5_mix665k.json's layout: a multi-turn chat about one image
    "id": "000000033471",
    "image": "coco/train2017/000000033471.jpg",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the circle?"},
        {"from": "gpt", "value": "It is red."},
        {"from": "human", "value": "Where is the square?"},
        {"from": "gpt", "value": "It is below the circle."},
    ],
}


@pytest.mark.parametrize("recipe", [r for r in RECIPES if SPECS[r].template != "chat_template" and not SPECS[r].anyres])
def test_recipe_data_settings_read_llava_records(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage 1 reads an LCS-558K record as its caption (supervised as LLaVA's plain: caption and
    newline, no eos), stage 2 a mix665k chat with only the replies (and their eos) supervised, each image padded to the tower's size and 576 tokens. (The Qwen
    recipe's chat_template needs Qwen's tokenizer, which cannot be downloaded here.)"""
    spec = SPECS[recipe]
    init_state = stage1_checkpoint(spec.stage1, monkeypatch) if spec.stage1 else None
    module = build(recipe, monkeypatch, init_state)
    data = LlavaDataModule(**parsed(recipe)["data"])
    data.spec = module.data_spec()  # what a Trainer would hand it
    builder = data.example_builder(data.hparams.train_view)
    tokenizer = module.tokenizer
    record = LCS_RECORD if spec.template == "plain" else MIX_RECORD
    (example,) = builder(record, [Image.new("RGB", (500, 375), (200, 30, 30))])
    assert example.pixel_values.shape == (1, 3, 336, 336)
    assert int((example.input_ids == module.image_token_id).sum()) == 576
    supervised = example.labels[example.labels >= 0].tolist()
    replies = [turn["value"] for turn in record["conversations"] if turn["from"] == "gpt"]
    if spec.template == "plain":  # LLaVA's preprocess_plain: the caption and its "\n", no eos
        expected = [i for reply in replies for i in tokenizer(reply + "\n", add_special_tokens=False)["input_ids"]]
    else:
        expected = [
            i
            for reply in replies
            for i in tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ]
    assert supervised == expected


# ---- the two-stage sequence, run for real on a CPU with tiny parts ----------------------------
TINY_PARTS = """
trainer: {{accelerator: cpu, log_every_n_steps: 1}}
model:
  tokenizer: {demo}/tokenizer
  vision:
    name: null
    config: {{model_type: clip_vision_model, image_size: 64, patch_size: 16, hidden_size: 32,
             intermediate_size: 64, num_hidden_layers: 3, num_attention_heads: 2}}
  llm:
    name: null
    config: {{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,
             num_attention_heads: 2, num_key_value_heads: 2}}
    lora: {{r: 4, alpha: 8}}
data: {{train_shards: "{demo}/train-{{000000..000003}}.tar", samples_per_epoch: 32, batch_size: 4,
       global_batch_size: 16, num_workers: 0, window_batches: 2}}
"""


def fit(recipe: str, tiny: Path, cwd: Path, *overrides: str) -> str:
    """`python -m src.cli fit` as a user runs it (Lightning starts the extra processes itself)."""
    command = [sys.executable, "-m", "src.cli", "fit", *config_args(configs_of(recipe))]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [*command, "--config", str(tiny), *overrides], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.slow
def test_stage1_then_stage2_run_as_written_with_tiny_parts(tmp_path: Path) -> None:
    """The recipes' own strategies, precision, callbacks, data settings and init_from path, with
    only the parts, the data and the hardware made tiny (CPU processes instead of GPUs): stage 1
    leaves final.ckpt where both stage-2 recipes look for it, they start from its projector, and
    the FSDP2 recipe runs sharded over 2 processes and saves distributed checkpoints. (7B only:
    the 13B recipes differ in hub ids and paths, which the tests above check.)"""
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(TINY_PARTS.format(demo=ROOT / "data_shards/demo"))
    runs = tmp_path / "runs/llava15_7b"  # the recipes' run directories are relative to where they start
    log = fit("llava15_7b/stage1_align", tiny, tmp_path, "--trainer.devices", "1")
    assert "global batch 16 = 4 per device x 1 processes x 4 accumulation steps" in log
    assert (runs / "stage1_align/checkpoints/final.ckpt").is_file()
    loaded = "init_from runs/llava15_7b/stage1_align/checkpoints/final.ckpt: loaded"

    log = fit("llava15_7b/stage2_lora", tiny, tmp_path, "--trainer.devices", "1")
    assert loaded in log
    assert (runs / "stage2_lora/checkpoints/final.ckpt").is_file()

    log = fit("llava15_7b/stage2_finetune", tiny, tmp_path, "--trainer.devices", "2")
    assert loaded in log and "FSDP2:" in log
    assert "global batch 16 = 4 per device x 2 processes x 2 accumulation steps" in log
    for name in ("final.ckpt", "last.ckpt"):  # distributed checkpoints: a folder, one shard per process
        assert (runs / "stage2_finetune/checkpoints" / name / ".metadata").is_file()


# ---- LLaVA-NeXT: anyres with unpad, its pinpoints, 4096 tokens --------------------------------
LLAVA_NEXT = [r for r in RECIPES if r.startswith("llava_next_")]


def test_the_llava_next_recipes_are_there() -> None:
    assert LLAVA_NEXT == ["llava_next_7b/stage1_align", "llava_next_7b/stage2_finetune"]


@pytest.mark.parametrize("recipe", LLAVA_NEXT)
def test_llava_next_recipes_pin_the_anyres_settings(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """LLaVA-NeXT's scripts: --image_aspect_ratio anyres, its --image_grid_pinpoints in their order,
    --mm_patch_merge_type spatial_unpad, --mm_vision_select_layer -2, --model_max_length 4096; zero3.json's
    "gradient_clipping": "auto" (the HF Trainer's 1.0); stage 2: --mm_vision_tower_lr 2e-6."""
    from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution

    from src.export_next import pinpoints

    config, spec = parsed(recipe), SPECS[recipe]
    vision = config["model"]["vision"]
    assert (vision["image_mode"], vision["anyres_merge"], vision["feature_layer"]) == ("anyres", "unpad", -2)
    assert [tuple(g) for g in vision["anyres_grids"]] == list(LLAVA_NEXT_GRIDS)
    assert config["data"]["max_length"] == 4096 and config["trainer"]["gradient_clip_val"] == 1.0
    optimizer = config["model"]["optimizer"]
    if spec.modes[0] == "full":
        assert (optimizer["lr"], optimizer["part_lr"]) == (2e-5, {"vision": 2e-6})
    init_state = stage1_checkpoint(spec.stage1, monkeypatch) if spec.stage1 else None
    if init_state is not None:  # stage 1's result holds the newline that stage 2's projector needs
        assert "projector.anyres.image_newline" in init_state
    model = build(recipe, monkeypatch, init_state).model
    layout = model.anyres_layout
    assert (layout.size, layout.view_tokens, layout.merge, layout.grids) == (336, 576, "unpad", LLAVA_NEXT_GRIDS)
    assert [layout(640, 480), layout(1500, 200)] == [2340, 1306]  # the figures, as transformers counts
    from src.model.vision import select_best_resolution

    assert select_best_resolution((300, 300), layout.grids) == (336, 672)  # a tie: the tall canvas, as LLaVA-NeXT
    assert layout.tokens_for(336, 1008) == 576 + 72 * 25  # a 1x3 canvas the image fills: 72 rows of 24 + newline
    assert max(layout(w, h) for w in range(100, 3000, 97) for h in range(100, 3000, 89)) <= 576 + 48 * 49 < 4096
    # exported as transformers' [height, width] pinpoints in this order, LlavaNext picks the kit's canvas
    exported = pinpoints(layout.grids)
    for width, height in [(300, 300), (336, 336), (640, 480), (480, 640), (1500, 200), (200, 1500), (10, 10)]:
        hf_h, hf_w = hf_select_best_resolution((height, width), exported)
        cols, rows = hf_w // 336, hf_h // 336
        assert layout.views_for(width, height) == 1 + cols * rows, (width, height)


@pytest.mark.parametrize("recipe", LLAVA_NEXT)
def test_llava_next_data_reads_a_record_as_anyres_views(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 500x375 photo: the base view and the 2x2 canvas' crops, and as many <image> tokens as the unpad merge makes."""
    spec = SPECS[recipe]
    init_state = stage1_checkpoint(spec.stage1, monkeypatch) if spec.stage1 else None
    module = build(recipe, monkeypatch, init_state)
    data = LlavaDataModule(**parsed(recipe)["data"])
    data.spec = module.data_spec()
    builder = data.example_builder(data.hparams.train_view)
    record = LCS_RECORD if spec.template == "plain" else MIX_RECORD
    (example,) = builder(record, [Image.new("RGB", (500, 375), (200, 30, 30))])
    assert example.pixel_values.shape == (5, 3, 336, 336)
    tokens = int((example.input_ids == module.image_token_id).sum())
    assert tokens == module.model.anyres_layout(500, 375) == 576 + 36 * 49  # 36 of 48 rows kept, + a newline each
