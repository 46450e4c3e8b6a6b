"""LlavaLitModule: schedule, freeze policy, config coercion, and skips reaching the logs."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from src.cli import main
from src.model.vision import VisionConfig
from src.training.module import FreezeConfig, LlavaLitModule, OptimizerConfig, _as_config, warmup_cosine

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "lightning_config.yaml")
TOKENIZER = str(ROOT / "data_shards/demo/tokenizer")
TINY = {
    "vision": VisionConfig(
        name="vit_tiny_patch16_224", image_size=64, kwargs={"patch_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}
    ),
    "llm": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "num_key_value_heads": 2}},
}  # fmt: skip


def test_warmup_then_cosine_to_the_floor():
    assert warmup_cosine(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 110, 0.1) == pytest.approx(0.1)


def test_freeze_policy_sets_what_trains():
    module = LlavaLitModule(TOKENIZER, freeze=FreezeConfig(vision="frozen", projector="full", llm="frozen"), **TINY)
    module.configure_model()
    trains = {
        part: {p.requires_grad for p in getattr(module.model, part).parameters()} for part in FreezeConfig().__dict__
    }
    assert trains == {"vision": {False}, "projector": {True}, "llm": {False}}
    spec = module.data_spec()
    assert spec["image_tokens"] == 4 and spec["image_transform"].size == 64


def test_unknown_freeze_mode_and_nothing_to_train():
    with pytest.raises(ValueError, match=r"freeze.llm: unknown mode 'lora'; choose one of \['frozen', 'full'\]"):
        LlavaLitModule(TOKENIZER, freeze=FreezeConfig(llm="lora"), **TINY)
    module = LlavaLitModule(TOKENIZER, freeze=FreezeConfig("frozen", "frozen", "frozen"), **TINY)
    module.configure_model()
    with pytest.raises(ValueError, match="nothing trains"):
        module.configure_optimizers()


def test_configs_come_as_dataclasses_or_checkpoint_dicts():
    assert _as_config(OptimizerConfig, {"lr": 1e-3}) == OptimizerConfig(lr=1e-3)
    assert _as_config(OptimizerConfig, None) == OptimizerConfig()
    with pytest.raises(TypeError, match="expected OptimizerConfig or a dict"):
        _as_config(OptimizerConfig, 3)
    with pytest.raises(TypeError):
        _as_config(OptimizerConfig, {"lrr": 1e-3})


def test_a_corrupt_sample_is_skipped_counted_and_logged_while_training_goes_on(tmp_path: Path):
    good = ROOT / "data_shards/demo/train-000000.tar"
    with tarfile.open(good) as tar:
        members = tar.getmembers()[:8]  # four scenes
        data = {m.name: tar.extractfile(m).read() for m in members}
    bad = tmp_path / "bad-000000.tar"
    with open(bad, "wb") as stream, wds.TarWriter(stream, encoder=False) as writer:
        writer.write({"__key__": "broken", "jpg": data[sorted(data)[0]], "json": b"{not json"})
        for i, name in enumerate(sorted(n for n in data if n.endswith(".json"))):
            key = name.removesuffix(".json")
            jpg = b"not a jpeg" if i == 0 else data[key + ".jpg"]
            writer.write({"__key__": f"s{i}", "jpg": jpg, "json": data[name]})
    (tmp_path / "sizes.json").write_text(json.dumps({"bad-000000.tar": 5}))
    root = tmp_path / "run"
    main([
        "fit", "--config", CONFIG, f"--trainer.default_root_dir={root}", "--trainer.max_steps=3",
        "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=0", "--data.num_workers=0",
        f"--data.train_shards={bad}", "--data.batch_size=4", "--data.shuffle_buffer=0",
    ])  # fmt: skip
    assert list(root.rglob("last.ckpt"))
    (events,) = root.rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    scalars = {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}
    # the shard opens with a broken JSON and a bad image: both counted before the first step
    assert scalars["data/skipped_train_bad_json"] == 1
    assert scalars["data/skipped_train_bad_image"] == 1
    assert len(acc.Scalars("train/loss")) == 3
