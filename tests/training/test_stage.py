"""src.training.stage: partial training, per-part learning rates, and checkpoints that hold
only what the config cannot rebuild."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from src.training.module import FreezeConfig, LlavaLitModule, OptimizerConfig

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = str(ROOT / "data_shards/demo/tokenizer")
VISION = {"name": "vit_tiny_patch16_224", "image_size": 64,
          "kwargs": {"patch_size": 32, "embed_dim": 32, "depth": 3, "num_heads": 2}}  # fmt: skip
LLM = {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                  "num_attention_heads": 2, "num_key_value_heads": 2}}  # fmt: skip


def module_with(freeze: FreezeConfig, optimizer: OptimizerConfig | None = None, **options) -> LlavaLitModule:
    torch.manual_seed(0)
    module = LlavaLitModule(TOKENIZER, vision=VISION, llm=LLM, freeze=freeze, optimizer=optimizer, **options)
    module.configure_model()
    return module


def trained_names(module: LlavaLitModule) -> set[str]:
    return {name for name, p in module.model.named_parameters() if p.requires_grad}


def test_partial_trains_the_last_blocks_only():
    module = module_with(FreezeConfig(vision="partial", vision_blocks=1, projector="frozen", llm="partial",
                                      llm_blocks=2))  # fmt: skip
    names = trained_names(module)
    layers = {int(n.split("layers.")[1].split(".")[0]) for n in names if n.startswith("llm.") and "layers." in n}
    assert layers == {1, 2}  # the last 2 of 3 decoder layers
    assert not any(n.startswith("projector.") for n in names)
    assert not any("embed_tokens" in n or "lm_head" in n for n in names)
    vision = [n for n in names if n.startswith("vision.")]
    kept_blocks = len(module.model.vision.wrap_modules())
    assert vision and all(f"blocks.{kept_blocks - 1}." in n for n in vision)


@pytest.mark.parametrize(
    ("freeze", "message"),
    [
        (FreezeConfig(llm="partial"), "freeze.llm: partial needs freeze.llm_blocks >= 1"),
        (
            FreezeConfig(projector="partial"),
            "freeze.projector: unknown mode 'partial'; choose one of ['frozen', 'full']",
        ),
    ],
)
def test_partial_needs_a_block_count(freeze, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        LlavaLitModule(TOKENIZER, vision=VISION, llm=LLM, freeze=freeze)


def test_more_blocks_than_the_part_has():
    with pytest.raises(ValueError, match="freeze.llm_blocks 5 is more than the 3 blocks the llm has"):
        module_with(FreezeConfig(llm="partial", llm_blocks=5))


def test_each_part_has_its_learning_rate_and_no_decay_on_vectors(monkeypatch):
    optimizer = OptimizerConfig(lr=2e-4, weight_decay=0.1, part_lr={"projector": 2e-5}, part_weight_decay={"llm": 0.0})
    module = module_with(FreezeConfig(vision="frozen", projector="full", llm="full"), optimizer)
    monkeypatch.setattr(
        type(module), "trainer", property(lambda self: type("T", (), {"estimated_stepping_batches": 10})())
    )
    opt = module.configure_optimizers()["optimizer"]
    groups = {g["name"]: g for g in opt.param_groups}
    assert sorted(groups) == ["llm", "llm/no_decay", "projector", "projector/no_decay"]
    assert groups["projector"]["initial_lr"] == 2e-5 and groups["llm"]["initial_lr"] == 2e-4
    assert groups["projector"]["weight_decay"] == 0.1 and groups["llm"]["weight_decay"] == 0.0
    assert groups["projector/no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim < 2 for p in groups["llm/no_decay"]["params"])
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_groups == {id(p) for p in module.model.parameters() if p.requires_grad}


def test_unknown_part_in_part_lr():
    with pytest.raises(ValueError, match=r"optimizer.part_lr: unknown parts \['tower'\]"):
        LlavaLitModule(TOKENIZER, vision=VISION, llm=LLM, optimizer=OptimizerConfig(part_lr={"tower": 1e-3}))


def save(module: LlavaLitModule, path: Path) -> dict:
    from lightning.pytorch import Trainer

    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, max_epochs=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize(
    ("freeze", "prefixes"),
    [
        (FreezeConfig(vision="frozen", projector="full", llm="frozen"), {"projector"}),  # stage 1
        (FreezeConfig(vision="frozen", projector="full", llm="lora"), {"projector", "llm-lora"}),
        (FreezeConfig(vision="frozen", projector="full", llm="full"), {"projector", "llm"}),
    ],
    ids=["stage1", "lora", "stage2"],
)
def test_checkpoints_hold_only_what_the_config_cannot_rebuild(tmp_path, freeze, prefixes):
    """Weights from init_from (as hub weights would be) are rebuilt; only trained ones are saved."""
    source = module_with(FreezeConfig(vision="full", projector="full", llm="full"))
    torch.save(source.model.state_dict(), tmp_path / "init.pt")
    options = {"llm": {**LLM, "lora": {"r": 2, "alpha": 4}}} if freeze.llm == "lora" else {}
    module = LlavaLitModule(TOKENIZER, vision=VISION, llm=options.get("llm", LLM), freeze=freeze,
                            init_from=str(tmp_path / "init.pt"))  # fmt: skip
    module.configure_model()
    with torch.no_grad():  # it trained: its weights differ from init_from's
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    saved = save(module, tmp_path / "m.ckpt")
    keys = {k.removeprefix("model.") for k in saved["state_dict"]}
    kinds = {("llm-lora" if "lora_" in k else k.split(".")[0]) for k in keys}
    assert kinds == prefixes
    assert saved["rebuilt_parts"] == ["llm", "projector", "vision"]
    loaded = LlavaLitModule.load_from_checkpoint(tmp_path / "m.ckpt", map_location="cpu")
    ours, theirs = module.model.state_dict(), loaded.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_run_without_rebuildable_parts_saves_everything(tmp_path):
    module = module_with(FreezeConfig(vision="frozen", projector="full", llm="frozen"))  # random init: nothing rebuilds
    saved = save(module, tmp_path / "m.ckpt")
    assert {k.removeprefix("model.") for k in saved["state_dict"]} == set(module.model.state_dict())
    assert "rebuilt_parts" not in saved


def test_activation_checkpointing_does_not_hide_trained_blocks_from_the_checkpoint(tmp_path):
    """checkpoint_wrapper renames parameters but not state-dict keys: trained layers must still be saved."""
    source = module_with(FreezeConfig(vision="full", projector="full", llm="full"))
    torch.save(source.model.state_dict(), tmp_path / "init.pt")
    module = LlavaLitModule(TOKENIZER, vision=VISION, llm=LLM, freeze=FreezeConfig(llm="full"),
                            init_from=str(tmp_path / "init.pt"), fsdp={"activation_checkpointing": True})  # fmt: skip
    module.configure_model()
    assert any("_checkpoint_wrapped_module" in name for name, _ in module.model.named_parameters())
    saved = save(module, tmp_path / "m.ckpt")
    layers = [k for k in saved["state_dict"] if ".layers." in k]
    assert layers and len(layers) == len([k for k in module.model.state_dict() if ".layers." in k])
