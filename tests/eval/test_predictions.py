"""`predict` end to end: prompts from shards or LLaVA JSON -> batched generation -> one JSONL line per sample.

A tiny randomly initialised LLaVA answers the demo test shard; the file must not depend on
the batch size (batched = unbatched, greedy and sampled) nor on the number of processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from tiny_models import tiny_lit_module

from src.data.datamodule import LlavaDataModule
from src.eval.predictions import PredictionWriter, read_predictions, unique_ids
from src.model.generation import GenerationConfig
from src.training.module import LlavaLitModule

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_module(demo_dir: Path, generation: GenerationConfig | None = None) -> LlavaLitModule:
    return tiny_lit_module(demo_dir, max_new_tokens=6, generation=generation)


def predict(module: LlavaLitModule, out: Path, batch_size: int, **data) -> list[dict]:
    dm = LlavaDataModule(eval_batch_size=batch_size, num_workers=0, system_prompt="", **data)
    trainer = Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[PredictionWriter(output=str(out), model_name="tiny")],
    )  # fmt: skip
    trainer.predict(module, datamodule=dm, return_predictions=False)
    return read_predictions(out)


def records_of(shard: str, read_tar) -> list[dict]:
    return [json.loads(members["json"]) for _, members in read_tar(shard)]


def test_one_line_per_sample_with_its_id_prompt_reference_and_answer(demo_dir, shards, read_tar, tmp_path):
    module = tiny_module(demo_dir)
    lines = predict(module, tmp_path / "p.jsonl", 4, predict_shards=shards["test"])
    records = records_of(shards["test"][0], read_tar)
    assert len(lines) == len(records) == 10
    assert [line["id"] for line in lines] == [r["id"] for r in records]  # input order, ids unique
    assert len({line["id"] for line in lines}) == 10
    for line, record in zip(lines, records, strict=True):
        # the whole prompt as the model read it: bos, the earlier turns, the last question, the generation prompt
        turns = record["conversations"][:-1]
        history = "".join(
            f"USER: {h['value']} ASSISTANT: {g['value']}</s>" for h, g in zip(turns[:-1:2], turns[1::2], strict=True)
        )
        assert line["prompt"] == f"<s> {history}USER: {turns[-1]['value']} ASSISTANT:"
        assert line["reference"] == record["conversations"][-1]["value"]
        assert isinstance(line["answer"], str) and line["finish"] in ("eos", "stop", "length")
        assert line["model"] == "tiny"
        assert line["settings"] == {"max_new_tokens": 6, "temperature": 0.0, "top_p": 1.0, "seed": None,
                                    "stop": [], "template": "vicuna_v1", "system_prompt": "", "max_length": 2048,
                                    "blank_images": False}  # fmt: skip
    assert any(line["answer"] for line in lines)
    assert not list(tmp_path.glob("*.rank*"))  # parts merged and removed

    # the answer is the decoded greedy reply to the prompt alone
    module.eval()
    spec = module.data_spec()
    from src.data.conversation import ConversationEncoder, build_template

    encoder = ConversationEncoder(spec["tokenizer"], build_template("vicuna_v1", ""), spec["image_tokens"])
    from PIL import Image

    for line, record, (_, members) in list(zip(lines, records, read_tar(shards["test"][0]), strict=True))[:3]:
        encoded = encoder.encode_prompt(record["conversations"][:-1], 1)
        prompt = encoded.input_ids
        assert line["prompt"] == encoded.text
        image = Image.open(__import__("io").BytesIO(members["jpg"])).convert("RGB")
        pixels = spec["image_transform"](image)
        pixels = pixels[None] if pixels.dim() == 3 else pixels
        with torch.no_grad():
            (reply,) = module.model.generate(torch.tensor([prompt]), torch.tensor([len(prompt)]), pixels, 6, 3)
        assert line["answer"] == module.tokenizer.decode(reply, skip_special_tokens=True).strip()


@pytest.mark.parametrize("generation", [None, GenerationConfig(temperature=1.0, top_p=0.9, seed=5)])
def test_the_file_does_not_depend_on_the_batch_size(demo_dir, shards, tmp_path, generation):
    module = tiny_module(demo_dir, generation)
    batched = predict(module, tmp_path / "b.jsonl", 4, predict_shards=shards["test"])
    alone = predict(module, tmp_path / "a.jsonl", 1, predict_shards=shards["test"])
    assert batched == alone
    if generation is not None:
        greedy = predict(tiny_module(demo_dir), tmp_path / "g.jsonl", 4, predict_shards=shards["test"])
        assert [g["answer"] for g in greedy] != [b["answer"] for b in batched]
        assert batched[0]["settings"]["temperature"] == 1.0 and batched[0]["settings"]["seed"] == 5


def test_stop_strings_cut_the_answers(demo_dir, shards, tmp_path):
    free = predict(tiny_module(demo_dir), tmp_path / "f.jsonl", 4, predict_shards=shards["test"])
    word = next(w for line in free for w in line["answer"].split()[1:2])  # a word some answer says second
    stopped = predict(
        tiny_module(demo_dir, GenerationConfig(stop=[word])), tmp_path / "s.jsonl", 4, predict_shards=shards["test"]
    )
    for f, s in zip(free, stopped, strict=True):
        if word in f["answer"]:
            assert s["finish"] == "stop" and word not in s["answer"]
            assert f["answer"].startswith(s["answer"])
        else:
            assert s == f | {"settings": s["settings"]}


def test_llava_json_with_an_image_folder(demo_dir, tmp_path, jpeg_bytes):
    images = tmp_path / "images"
    images.mkdir()
    (images / "red.jpg").write_bytes(jpeg_bytes((200, 30, 30)))
    (images / "blue.png").write_bytes(jpeg_bytes((30, 30, 200), fmt="PNG"))
    records = [
        {"id": "q-red", "image": "red.jpg",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"}]},
        {"image": "blue.png", "conversations": [{"from": "human", "value": "What colour is it?\n<image>"}]},
        {"id": "text", "conversations": [{"from": "human", "value": "How many objects are there?"}]},
        {"id": "lost", "image": "missing.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"}]},
        {"id": "q-red", "image": "red.jpg", "conversations": [{"from": "human", "value": "<image>\nAgain?"}]},
    ]  # fmt: skip
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "not json\n")
    with pytest.warns(UserWarning, match=r"2 samples skipped and not answered \(bad_json: 1, missing_image: 1\)"):
        lines = predict(
            tiny_module(demo_dir), tmp_path / "p.jsonl", 2, predict_json=str(path), predict_images=str(images)
        )
    assert [line["id"] for line in lines] == ["q-red", "1", "text", "q-red_2"]  # no id: its index; repeats renamed
    assert [line["reference"] for line in lines] == ["red", None, None, None]
    assert lines[1]["prompt"] == "<s> USER: <image>\nWhat colour is it? ASSISTANT:"  # the tag moved as LLaVA does
    assert all(isinstance(line["answer"], str) for line in lines)


def test_predict_without_data_says_what_to_set(demo_dir):
    dm = LlavaDataModule(num_workers=0)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="data.predict_shards or data.predict_json is not set"):
        trainer.predict(tiny_module(demo_dir), datamodule=dm)
    with pytest.raises(ValueError, match="set data.predict_shards or data.predict_json, not both"):
        LlavaDataModule(predict_shards="a.tar", predict_json="b.json")


def test_unique_ids_renames_repeats_in_order():
    rows = [{"id": "a"}, {"id": "b"}, {"id": "a"}, {"id": "a_2"}, {"id": "a"}]
    assert unique_ids(rows) == 2
    assert [r["id"] for r in rows] == ["a", "b", "a_3", "a_2", "a_4"]


# ---- the CLI, one and two processes --------------------------------------------------------

CONFIG = str(ROOT / "lightning_config.yaml")
FAST = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--data.batch_size=4", "--data.samples_per_epoch=8", "--data.num_workers=0"]  # fmt: skip


def cli(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "src.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_cli_predict_writes_the_same_file_with_one_or_two_processes(tmp_path, shards):
    cli("fit", "--config", CONFIG, f"--trainer.default_root_dir={tmp_path / 'fit'}", *FAST)
    (ckpt,) = (tmp_path / "fit").rglob("last.ckpt")
    common = ["--config", CONFIG, f"--ckpt_path={ckpt}", f"--data.predict_shards={shards['test'][0]}",
              "--data.eval_batch_size=3", "--data.num_workers=0"]  # fmt: skip
    one = cli("predict", *common, f"--trainer.default_root_dir={tmp_path / 'one'}")
    default = tmp_path / "one" / "lightning_logs" / "version_0" / "predictions.jsonl"  # the documented default
    assert default.is_file() and f"wrote 10 predictions to {default}" in one.stdout + one.stderr
    cli(
        "predict",
        *common,
        f"--trainer.default_root_dir={tmp_path / 'two'}",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
    )
    two_path = tmp_path / "two" / "lightning_logs" / "version_0" / "predictions.jsonl"
    lines = read_predictions(default)
    assert len(lines) == 10 and len({line["id"] for line in lines}) == 10
    assert lines[0]["model"] == str(ckpt) and lines[0]["settings"]["max_new_tokens"] == 16
    assert two_path.read_text() == default.read_text()
    # sampled: each sample draws from its own generator, so the split across processes does not matter
    sampled = [*common, "--model.generation.temperature=5.0", "--model.generation.top_p=0.95"]
    cli("predict", *sampled, f"--trainer.default_root_dir={tmp_path / 's1'}")
    cli("predict", *sampled, f"--trainer.default_root_dir={tmp_path / 's2'}", "--trainer.devices=2",
        "--trainer.strategy=ddp")  # fmt: skip
    one_sampled, two_sampled = (
        tmp_path / s / "lightning_logs" / "version_0" / "predictions.jsonl" for s in ("s1", "s2")
    )
    assert one_sampled.read_text() == two_sampled.read_text()
    assert [line["answer"] for line in read_predictions(one_sampled)] != [line["answer"] for line in lines]


# ---- the prompt view: a chat without its last reply, encoded as training saw it ----------------


def test_the_model_field_names_the_weights_that_answered():
    class Imported:  # what LlavaLitModule exposes about its weights
        hparams = {"init_from": "imported/weights.pt"}
        init_parts = {"vision", "projector", "llm"}

        def rebuildable_parts(self):
            return {"vision", "projector", "llm"}

    class Trainer:
        ckpt_path = None

    writer = PredictionWriter()
    assert writer.model_label(Trainer(), Imported()) == "init_from imported/weights.pt (no --ckpt_path)"
    assert writer.model_label(Trainer(), object()) == "untrained (no --ckpt_path)"
    Trainer.ckpt_path = "runs/x/last.ckpt"
    assert writer.model_label(Trainer(), Imported()) == "runs/x/last.ckpt"
