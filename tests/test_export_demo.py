"""The exportable demo end to end: train it, `predict`, export, and answer with transformers alone.

The answers of a fresh Python process that imports transformers and nothing of the kit, and that
reads only the exported folder (its processor and chat template, its generation config), must be
the answers the kit's `predict` wrote, sample for sample. That is what a user checks first when
they take a kit model to transformers, vLLM or lmms-eval.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from src.cli import main as cli_main
from src.eval.predictions import read_predictions
from src.export import main as export_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments/demo/exportable.yaml"
STEPS = 20  # enough for the replies to take the trained shape (a word, then eos)

# What a transformers user writes: no import from the kit, nothing but the folder's files.
TRANSFORMERS_ONLY = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

folder, questions = sys.argv[1], json.load(open(sys.argv[2]))
torch.set_num_threads(1)
processor = AutoProcessor.from_pretrained(folder)
model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
answers = {}
for q in questions:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q["question"]}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.open(q["image"]).convert("RGB"), text=text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs)  # every setting from the folder's generation_config.json
    reply = out[0, inputs["input_ids"].shape[1]:]
    answers[q["id"]] = {"answer": processor.decode(reply, skip_special_tokens=True).strip(), "prompt": text,
                        "ended": bool(reply[-1] == model.generation_config.eos_token_id)}
print(json.dumps(answers))
"""


def shard_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, _, suffix = member.name.partition(".")
            samples.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return samples


@pytest.mark.slow
def test_transformers_alone_answers_as_the_kits_predict(demo_dir, tmp_path, capsys):
    data = [
        f"--data.train_shards={demo_dir}/train-{{000000..000003}}.tar",
        f"--data.val_shards={demo_dir}/val-000000.tar",
        f"--data.predict_shards={demo_dir}/predict-000000.tar",
        "--data.num_workers=0",
        "--data.batch_size=8",
        "--data.shuffle_buffer=50",
    ]
    common = ["--config", str(CONFIG), f"--model.tokenizer={demo_dir}/tokenizer", f"--trainer.default_root_dir={tmp_path}",
              "--trainer.enable_progress_bar=false", *data]  # fmt: skip
    cli_main(["fit", *common, f"--trainer.max_steps={STEPS}", "--trainer.limit_val_batches=0"])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    cli_main(["predict", *common, f"--ckpt_path={ckpt}"])
    rows = read_predictions(next(tmp_path.rglob("predictions.jsonl")))  # the demo config's PredictionWriter

    assert export_main(["to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    folder = tmp_path / "hf"
    generation = json.loads((folder / "generation_config.json").read_text())
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (2, 3, 0)
    assert tokenizer_config["bos_token"] == "<s>" and tokenizer_config["eos_token"] == "</s>"
    assert generation["max_new_tokens"] == 16 and generation.get("do_sample", False) is False

    # the questions as a transformers user has them: an image file and the question's text
    samples = shard_samples(demo_dir / "predict-000000.tar")
    questions = []
    for key, members in samples.items():
        record = json.loads(members["json"])
        image = tmp_path / f"{key}.jpg"
        image.write_bytes(members["jpg"])
        human = record["conversations"][0]["value"]
        questions.append({"id": record["id"], "image": str(image), "question": human.removeprefix("<image>\n")})
    (tmp_path / "questions.json").write_text(json.dumps(questions))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", TRANSFORMERS_ONLY, str(folder), str(tmp_path / "questions.json")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = json.loads(result.stdout.strip().splitlines()[-1])

    assert len(rows) == len(questions) == 10
    assert {row["id"] for row in rows} == set(theirs)
    assert [row["answer"] for row in rows] == [theirs[row["id"]]["answer"] for row in rows]
    # the prompt predict wrote is the text the exported chat template renders
    assert [row["prompt"] for row in rows] == [theirs[row["id"]]["prompt"] for row in rows]
    finishes = [row["finish"] for row in rows]
    assert [f == "eos" for f in finishes] == [theirs[row["id"]]["ended"] for row in rows]
    assert "eos" in finishes  # the trained shape: replies end, so the eos id is exercised
