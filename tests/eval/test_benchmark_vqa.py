"""GQA and TextVQA: releases in the official JSON layouts, and the scorers against lmms-eval's
(`exact_match` with ignore_case / ignore_punctuation for GQA; `textvqa_process_results` with
`EvalAIAnswerProcessor` for TextVQA) on the same replies, cell for cell; the VQA normalisation
against `EvalAIAnswerProcessor` on every contraction of its table and on generated text."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from src.eval.__main__ import main
from src.eval.answers import read_short_answer
from src.eval.benchmarks.vqa import vqa_accuracy
from src.eval.vqa_normalize import CONTRACTIONS, normalize_vqa_answer
from tests.eval.bench_helpers import evaluate, write_image, write_predictions
from tests.eval.lmms_reference import lmms_modules

SHORT = "\nAnswer the question using a single word or phrase."
GQA_ANSWERS = ["yes", "no", "left", "table", "the man", "red", "t-shirt", "2"]
FORMS = ["{a}", "{A}", "{a}.", " {a} \n", "The {a}", "{a}!", "'{a}'", "not {a}", "", "two", "{a}, {a}", "{A}?"]
TEXTVQA_ANSWERS = ["coca cola", "Coca-Cola", "coca-cola", "pepsi", "2", "two", "the 3rd", "don't", "dont", "1,000",
                   "3.5", "stop.", "unanswerable", "a b", "(c)"]  # fmt: skip


def write_gqa(root: Path, count: int = 40) -> Path:
    rng = random.Random(7)
    questions = {}
    for n in range(count):
        questions[f"20{n:05d}"] = {
            "imageId": f"n{n % 3}", "question": f"What is thing {n}?", "answer": rng.choice(GQA_ANSWERS),
            "fullAnswer": "...", "types": {"structural": rng.choice(["query", "verify", "choose"]), "semantic": "obj"},
        }  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    (root / "testdev_balanced_questions.json").write_text(json.dumps(questions))
    for i in range(3):
        write_image(root / "images" / f"n{i}.jpg")
    return root


def write_textvqa(root: Path, count: int = 40) -> Path:
    rng = random.Random(8)
    data = [
        {"question_id": 34602 + n, "question": f"what brand IS shown {n}?", "image_id": f"{n % 2:016x}",
         "answers": [rng.choice(TEXTVQA_ANSWERS[: 3 + n % 12]) for _ in range(10)], "image_classes": []}
        for n in range(count)
    ]  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    (root / "TextVQA_0.5.1_val.json").write_text(
        json.dumps({"dataset_name": "textvqa", "dataset_type": "val", "data": data})
    )
    for i in range(2):
        write_image(root / "train_images" / f"{i:016x}.jpg")
    return root


def replies_from(pool: list[str], questions: list, seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    replies = {}
    for q in questions:
        answer = rng.choice(pool)
        replies[q.id] = rng.choice(FORMS).format(a=answer, A=answer.upper())
    return replies


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gqa_equals_lmms_eval(tmp_path: Path, seed: int) -> None:
    root = write_gqa(tmp_path / "gqa")
    with lmms_modules("api/metrics.py", "tasks/gqa/utils.py") as loaded:
        metrics, utils = loaded["api/metrics.py"], loaded["tasks/gqa/utils.py"]
        questions, _ = evaluate("gqa", {}, root=root, split="testdev", images=None)
        replies = replies_from(GQA_ANSWERS, questions, seed)
        questions, result = evaluate("gqa", replies, root=root, split="testdev", images=None)
        release = json.loads((root / "testdev_balanced_questions.json").read_text())
        scores: dict[str, list[float]] = {}
        for q in questions:
            doc = release[q.id]
            assert q.prompt == utils.gqa_doc_to_text(doc, {"pre_prompt": "", "post_prompt": SHORT})
            score = metrics.exact_match_hf_evaluate(
                predictions=[replies[q.id].strip()],
                references=[doc["answer"]],
                ignore_case=True,
                ignore_punctuation=True,
            )["exact_match"]
            for group in (q.group, "all"):
                scores.setdefault(group, []).append(float(score))
        computed = result["computed"]
        for group, values in scores.items():
            assert float(computed[group]) == pytest.approx(metrics.mean(values), abs=1e-12), group
        assert 0 < float(computed["all"]) < 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_textvqa_equals_lmms_eval(tmp_path: Path, seed: int) -> None:
    root = write_textvqa(tmp_path / "textvqa")
    files = ("tasks/_task_utils/file_utils.py", "tasks/_task_utils/vqa_eval_metric.py", "tasks/textvqa/utils.py")
    with lmms_modules(*files) as loaded:
        utils = loaded["tasks/textvqa/utils.py"]
        questions, _ = evaluate("textvqa", {}, root=root, split="val", images=None)
        replies = replies_from(TEXTVQA_ANSWERS, questions, seed)
        questions, result = evaluate("textvqa", replies, root=root, split="val", images=None)
        data = {d["question_id"]: d for d in json.loads((root / "TextVQA_0.5.1_val.json").read_text())["data"]}
        scores = []
        for q in questions:
            doc = dict(data[q.info["question_id"]], answers=list(data[q.info["question_id"]]["answers"]))
            assert q.prompt == utils.textvqa_doc_to_text(doc, {"pre_prompt": "", "post_prompt": SHORT, "ocr": False})
            scores.append(utils.textvqa_process_results(doc, [replies[q.id].strip()])["exact_match"])
        assert float(result["computed"]["all"]) == pytest.approx(sum(scores) / len(scores), abs=1e-12)
        assert 0 < float(result["computed"]["all"]) < 1


def processor():
    with lmms_modules("tasks/_task_utils/vqa_eval_metric.py") as loaded:
        return loaded["tasks/_task_utils/vqa_eval_metric.py"].EvalAIAnswerProcessor


def test_vqa_normalisation_table_equals_lmms_eval() -> None:
    official = processor()
    assert CONTRACTIONS == official.CONTRACTIONS
    run = official()
    for text in [*CONTRACTIONS, *CONTRACTIONS.values(), *TEXTVQA_ANSWERS, "x. " * 40, "1,000.5 a", "He's 3."]:
        assert normalize_vqa_answer(text) == run(text), text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab1 ,.?!'-()/;:\n\tTheAn0")), max_size=30))
def test_vqa_normalisation_on_generated_text(text: str) -> None:
    assert normalize_vqa_answer(text) == processor()()(text)


def test_vqa_accuracy_by_hand() -> None:
    answers = ["red"] * 3 + ["blue"] * 7
    # "red": leaving a red out leaves 2 matches (2/3) three times, else 3 matches (1): (3 * 2/3 + 7) / 10
    assert vqa_accuracy("red", answers) == pytest.approx(0.9)
    assert vqa_accuracy("blue", answers) == 1.0 and vqa_accuracy("green", answers) == 0.0
    assert read_short_answer(" The Two dogs.\n") == "2 dogs"


def test_textvqa_cli(tmp_path: Path) -> None:
    root = write_textvqa(tmp_path / "t", count=3)
    main(["convert", "textvqa", "--root", str(root), "--out", str(tmp_path / "out")])
    records = json.loads((tmp_path / "out" / "textvqa_val.json").read_text())
    assert records[0]["conversations"][0]["value"] == f"<image>\nWhat brand is shown 0?{SHORT}"
    assert records[0]["image"] == f"{0:016x}.jpg" and (tmp_path / "out" / "textvqa_val-000000.tar").is_file()
    replies = {r["id"]: r["conversations"][1]["value"] for r in records}
    main(["score", "textvqa", "--root", str(root), "--predictions", str(write_predictions(tmp_path / "p.jsonl", replies)),
          "--out", str(tmp_path / "r")])  # fmt: skip
    assert json.loads((tmp_path / "r" / "report.json").read_text())["rows"][""]["accuracy"] > 0
