"""MMBench: the official TSV (base64 images, shared images, missing options and hints), the
rotations the converter adds, and circular scoring against lmms-eval's `MMBench_Evaluator`
(`eval_result`, static reading) on the same replies, cell for cell: overall, per category,
per L2 category."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import random
from pathlib import Path

import pytest
from PIL import Image

from src.eval.__main__ import main
from tests.eval.bench_helpers import evaluate, write_predictions
from tests.eval.lmms_reference import lmms_modules

COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
           "comment", "split"]  # fmt: skip
QUESTIONS = [  # question, hint, options, answer letter, category, l2
    ("What animal is shown?", "A photo.", ["cat", "dog", "bird", "fish"], "A", "identity", "fine-grained"),
    ("Which colour dominates?", "", ["red", "green", "blue"], "C", "attribute", "coarse"),
    ("Is it daytime?", "nan", ["yes", "no"], "B", "attribute", "coarse"),
    ("How many cars?", "Count them.", ["one", "two", "three", "four"], "D", "counting", "fine-grained"),
    ("Where is this?", "", ["a beach", "a forest", "a city", "a desert"], "B", "scene", "coarse"),
    ("What is A?", "", ["A", "letter B", "C sharp"], "A", "identity", "fine-grained"),
]


def png_b64(colour: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (colour, 0, 0)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path: Path, rotated: bool) -> Path:
    """The official TSV; with `rotated`, the file carries the rotations itself (index + k * 10**6)."""
    rows = []
    for n, (question, hint, options, answer, category, l2) in enumerate(QUESTIONS):
        padded = options + [""] * (4 - len(options))
        image = str(0) if n == 4 else png_b64(n * 40)  # row 4 shares row 0's image, as VLMEvalKit writes it
        rows.append([n, question, hint, *padded, answer, category, image, "src", l2, "", "dev"])
        if rotated:
            for k in range(1, len(options)):
                shifted = options[k:] + options[:k] + [""] * (4 - len(options))
                letter = "ABCD"[("ABCD".index(answer) - k) % len(options)]
                rows.append([n + k * 10**6, question, hint, *shifted, letter, category, str(n), "src", l2, "", "dev"])
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream, delimiter="\t")
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return path


def replies_for(questions: list, seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    replies = {}
    for q in questions:
        options = q.info["options"]
        letter = q.truth if rng.random() < 0.95 else rng.choice("ABCDE")
        text = options.get(letter, "none of these")
        replies[q.id] = rng.choice([
            letter, f"{letter}.", f"({letter})", f"The answer is {letter}", f"{letter}. {text}", text,
            f"I think it is {text}.", "", "I do not know", f"A {text}", f"Option {letter}: {text}", f" {letter}\n",
        ])  # fmt: skip
    return replies


def lmms_doc(q) -> dict:
    doc = {"index": q.info["index"], "question": q.prompt.split(" There are several options:")[0], "hint": float("nan"),
           "answer": q.truth, "category": q.group, "L2-category": q.info["l2"], "source": "src", "split": "dev"}  # fmt: skip
    if q.info["hint"] is not None:
        doc["hint"] = q.info["hint"]
        doc["question"] = doc["question"][len(q.info["hint"]) + 1 :]
    for letter in "ABCD":
        doc[letter] = q.info["options"].get(letter, float("nan"))
    return doc


@pytest.mark.parametrize("rotated", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_mmbench_equals_lmms_eval(tmp_path: Path, rotated: bool, seed: int) -> None:
    tsv = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", rotated)
    files = ("tasks/_task_utils/file_utils.py", "tasks/_task_utils/mcq_extract.py", "tasks/mmbench/mmbench_evals.py",
             "tasks/mmbench/en_utils.py")  # fmt: skip
    with lmms_modules(*files, needs=("pandas", "yaml")) as loaded:
        en_utils = loaded["tasks/mmbench/en_utils.py"]
        questions, _ = evaluate("mmbench", {}, root=tsv, split="dev")
        assert len(questions) == sum(len(options) for _, _, options, *_ in QUESTIONS)
        replies = replies_for(questions, seed)
        questions, result = evaluate("mmbench", replies, root=tsv, split="dev")
        post = {"pre_prompt": "", "post_prompt": "\nAnswer with the option's letter from the given choices directly."}
        results = []
        for q in questions:
            doc = lmms_doc(q)
            assert q.prompt == en_utils.mmbench_doc_to_text(doc, post)
            results.append(en_utils.mmbench_process_results(doc, [replies[q.id].strip()])["gpt_eval_score"])
        overall, categories, l2 = en_utils.mmbench_evaluator.eval_result(results, eval_method="static")
        computed = result["computed"]
        assert float(computed["all"]) == pytest.approx(overall, abs=1e-12)
        assert {k.removeprefix("category/"): pytest.approx(float(v), abs=1e-12)
                for k, v in computed.items() if k.startswith("category/")} == categories  # fmt: skip
        assert {k.removeprefix("l2/"): pytest.approx(float(v), abs=1e-12)
                for k, v in computed.items() if k.startswith("l2/")} == l2  # fmt: skip
        assert not math.isnan(overall)


def test_mmbench_rotations_and_circular_hits(tmp_path: Path) -> None:
    tsv = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", rotated=False)
    questions, _ = evaluate("mmbench", {}, root=tsv, split="dev")
    three = [q for q in questions if q.info["index"] % 10**6 == 1]
    assert [(q.info["index"], q.info["options"], q.truth) for q in three] == [
        (1, {"A": "red", "B": "green", "C": "blue"}, "C"),
        (1000001, {"A": "green", "B": "blue", "C": "red"}, "B"),
        (2000001, {"A": "blue", "B": "red", "C": "green"}, "A"),
    ]
    right = {q.id: q.truth for q in questions}
    _, result = evaluate("mmbench", right, root=tsv, split="dev")
    assert float(result["computed"]["all"]) == 1.0
    right["1000001"] = "C"  # one rotation wrong: question 1 is a miss
    _, result = evaluate("mmbench", right, root=tsv, split="dev")
    assert float(result["computed"]["all"]) == pytest.approx(5 / 6)
    assert float(result["computed"]["category/attribute"]) == 0.5
    predictions = write_predictions(tmp_path / "p.jsonl", right)
    main(["convert", "mmbench", "--root", str(tsv), "--out", str(tmp_path / "out")])
    records = json.loads((tmp_path / "out" / "mmbench_dev.json").read_text())
    assert records[0]["conversations"][0]["value"] == (
        "<image>\nA photo. What animal is shown? There are several options:\nA. cat\nB. dog\nC. bird\nD. fish"
        "\n\nAnswer with the option's letter from the given choices directly."
    )
    shared = [r for r in records if r["id"] == "4"][0]
    assert (tmp_path / "out" / "images" / shared["image"]).read_bytes() == base64.b64decode(png_b64(0))
    assert (tmp_path / "out" / "mmbench_dev-000000.tar").is_file()
    main(["score", "mmbench", "--root", str(tsv), "--predictions", str(predictions), "--out", str(tmp_path / "r")])
    assert json.loads((tmp_path / "r" / "report.json").read_text())["rows"][""]["overall"] == round(500 / 6, 2)
