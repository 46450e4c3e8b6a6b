"""Faults during training: a NaN / inf loss skips its step; too many in a row stop the run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_fit import make_rows
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from src.data.stream import collate
from src.training.module import FreezeConfig, LlavaLitModule, OptimizerConfig

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[2]


def tiny(**options) -> LlavaLitModule:
    torch.manual_seed(0)
    return LlavaLitModule(
        str(ROOT / "data_shards/demo/tokenizer"),
        vision={"name": "vit_tiny_patch16_224", "image_size": 64,
                "kwargs": {"patch_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}},
        llm={"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "num_key_value_heads": 2}},
        freeze=FreezeConfig(vision="full", projector="full", llm="full"),
        optimizer=OptimizerConfig(lr=1e-3, warmup_steps=0),
        **options,
    )  # fmt: skip


def batches(module: LlavaLitModule, poisoned: set[int], count: int) -> DataLoader:
    rows = make_rows(count, equal_lengths=True, image_id=module.image_token_id)
    out = []
    for i in range(count):
        batch = collate(rows[4 * i : 4 * i + 4], pad_id=0)
        if i in poisoned:
            batch["pixel_values"][0, 0, 0, 0] = float("nan")
        out.append(batch)
    return DataLoader(out, batch_size=None)


def fit(module: LlavaLitModule, loader: DataLoader, steps: int) -> Trainer:
    trainer = Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def test_a_nan_step_is_skipped_counted_and_training_goes_on():
    module = tiny()
    trainer = fit(module, batches(module, poisoned={1}, count=5), steps=4)
    assert trainer.global_step == 4  # five batches, one skipped: four optimizer steps
    assert module.bad_total == 1 and module.bad_steps == 0
    assert float(trainer.callback_metrics["train/skipped_nonfinite"]) == 1.0
    assert all(torch.isfinite(p).all() for p in module.model.parameters())


def test_too_many_bad_steps_in_a_row_stop_the_run_with_the_advice():
    module = tiny(max_bad_steps=3)
    with pytest.raises(RuntimeError, match=r"3 steps in a row had a NaN or infinite loss .* Lower optimizer.lr"):
        fit(module, batches(module, poisoned={0, 1, 2, 3}, count=4), steps=4)


def test_out_of_memory_names_the_knobs_to_turn(monkeypatch):
    module = tiny()
    loader = batches(module, poisoned=set(), count=2)

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    module.configure_model()
    monkeypatch.setattr(module.model, "forward", no_memory)
    with pytest.raises(RuntimeError) as info:
        fit(module, loader, steps=1)
    message = str(info.value)
    assert message.startswith("out of memory at step 0 (this batch: (4, 15) tokens). Free memory by")
    for knob in ("data.batch_size", "activation_checkpointing", "ModelParallelStrategy", "freeze.llm: lora"):
        assert knob in message
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
