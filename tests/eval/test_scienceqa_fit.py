"""Validation during fit on converted ScienceQA shards: val loss and multiple-choice accuracy
(overall and per column of the paper's table) reach TensorBoard."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_scienceqa_release import write_release
from tiny_models import tiny_lit_module

from src.cli import main
from src.eval.scienceqa_data import convert

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "lightning_config.yaml")


def test_a_tiny_fit_validates_on_scienceqa_shards(tmp_path, shards, single_thread):
    release = write_release(tmp_path / "sqa")
    convert(release, "test", "CQM-A", tmp_path / "val")
    (val,) = sorted((tmp_path / "val").glob("*.tar"))
    run = tmp_path / "run"
    main([
        "fit", "--config", CONFIG, f"--trainer.default_root_dir={run}", "--trainer.max_steps=2",
        "--trainer.val_check_interval=2", "--trainer.limit_val_batches=4", "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false", "--data.num_workers=0", f"--data.train_shards={shards['train'][0]}",
        f"--data.val_shards={val}", "--data.batch_size=4", "--data.eval_batch_size=3", "--data.shuffle_buffer=0",
        "--data.mc_format=letter", "--trainer.callbacks=[]",
        "--model.llm.config.hidden_size=32", "--model.llm.config.intermediate_size=64",
        "--model.llm.config.num_hidden_layers=1",
        "--model.vision.kwargs={patch_size: 32, embed_dim: 32, depth: 2, num_heads: 2}",
    ])  # fmt: skip
    (events,) = run.rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    scalars = {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}
    assert scalars["val/loss"] > 0
    assert 0 <= scalars["val/mc_accuracy"] <= 1
    # per column of the paper's table: the converter types each question by the columns it counts in
    columns = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")
    assert {f"val/mc_accuracy_{c}" for c in columns} <= set(scalars)
    # all 8 questions scored: the accuracy is a multiple of 1/8
    assert abs(scalars["val/mc_accuracy"] * 8 - round(scalars["val/mc_accuracy"] * 8)) < 1e-5


def test_predict_answers_every_converted_question_and_score_reads_the_file(tmp_path, demo_dir, single_thread):
    """convert -> `predict` (the kit's generation, a tiny random model) -> score: every pid is
    predicted under its own id, with the CQM-A prompt, and the report accounts for all 8."""
    import json

    from lightning.pytorch import Trainer

    from src.data.datamodule import LlavaDataModule
    from src.eval.predictions import PredictionWriter
    from src.eval.scienceqa import score

    release = write_release(tmp_path / "sqa")
    convert(release, "test", "CQM-A", tmp_path / "shards")
    module = tiny_lit_module(demo_dir, layers=1, max_new_tokens=4)
    preds = tmp_path / "preds.jsonl"
    data = LlavaDataModule(
        predict_shards=str(next((tmp_path / "shards").glob("*.tar"))),
        eval_batch_size=3,
        num_workers=0,
        system_prompt="",
    )
    trainer = Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[PredictionWriter(output=str(preds), model_name="tiny")],
    )  # fmt: skip
    trainer.predict(module, datamodule=data, return_predictions=False)
    rows = {row["id"]: row for row in map(json.loads, preds.read_text().splitlines())}
    assert sorted(rows, key=int) == [str(pid) for pid in range(1, 9)]
    assert "Context: Look at the map." in rows["4"]["prompt"]
    assert (
        rows["4"]["prompt"]
        .rstrip()
        .endswith("Answer with the option's letter from the given choices directly. ASSISTANT:")
    )
    assert rows["4"]["reference"] == "B"
    score(release, "test", preds, tmp_path / "report")
    report = json.loads((tmp_path / "report/report.json").read_text())
    assert report["counts"]["all"] == 8 and report["missing"] == [] and report["method"] == "tiny"
