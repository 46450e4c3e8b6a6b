"""MME: both official folder layouts, and the scorer against lmms-eval's `mme_process_results` +
`mme_aggregate_results` (per subtask, and the Perception / Cognition sums), cell for cell."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from src.eval.__main__ import main
from tests.eval.bench_helpers import evaluate, pick, write_image, write_predictions
from tests.eval.lmms_reference import lmms_modules

# subtask -> official layout: "flat" (images and .txt side by side) or "YN" (images/ + questions_answers_YN/)
SUBTASKS = {"existence": "flat", "artwork": "YN", "OCR": "flat", "code_reasoning": "flat", "text_translation": "YN"}
REPLIES = ["Yes", "No", "yes.", "No, it is not.", "Yes, there is", "y", "n", "maybe", "", "Not sure", "noo",
           "YES!", "The answer is yes"]  # fmt: skip


def write_release(root: Path, images: int = 4) -> Path:
    for s, (subtask, layout) in enumerate(SUBTASKS.items()):
        text_dir = root / subtask / ("questions_answers_YN" if layout == "YN" else "")
        image_dir = root / subtask / ("images" if layout == "YN" else "")
        for i in range(images):
            stem = f"{1000 + i}.v{s}"  # a dot in the stem, as some official names have
            write_image(image_dir / f"{stem}.{'jpg' if i % 2 else 'png'}")
            first, second = ("Yes", "No") if (i + s) % 2 else ("No", "Yes")
            text_dir.mkdir(parents=True, exist_ok=True)
            (text_dir / f"{stem}.txt").write_text(
                f"Is this thing {i}? Please answer yes or no.\t{first}\nIs it red {i}? Please answer yes or no.\t{second}\n"
            )
    return root


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mme_equals_lmms_eval(tmp_path: Path, seed: int) -> None:
    root = write_release(tmp_path / "mme")
    with lmms_modules("tasks/mme/utils.py") as loaded:
        utils = loaded["tasks/mme/utils.py"]
        questions, _ = evaluate("mme", {}, root=root, split="test")
        replies = dict(zip([q.id for q in questions], pick(REPLIES, len(questions), seed), strict=True))
        questions, result = evaluate("mme", replies, root=root, split="test")
        computed = result["computed"]
        by_key: dict[str, list] = {"mme_perception_score": [], "mme_cognition_score": []}
        by_subtask: dict[str, list] = {}
        kwargs = {"pre_prompt": "", "post_prompt": "\nAnswer the question using a single word or phrase."}
        for q in questions:
            text_dir = root / q.group / ("questions_answers_YN" if SUBTASKS[q.group] == "YN" else "")
            line = (text_dir / f"{Path(q.info['image_name']).stem}.txt").read_text().splitlines()[int(q.id[-1])]
            question, answer = line.split("\t")
            doc = {"question_id": f"{q.group}/{q.info['image_name']}", "question": question, "answer": answer,
                   "category": q.group}  # fmt: skip
            assert q.prompt == utils.mme_doc_to_text(doc, kwargs)
            for key, value in utils.mme_process_results(doc, [replies[q.id].strip()]).items():
                by_key[key].append(value)
                by_subtask.setdefault(q.group, []).append(value)
        for subtask, results in by_subtask.items():
            assert float(computed[f"{subtask}/score"]) == pytest.approx(utils.mme_aggregate_results(results), abs=1e-9)
        assert float(computed["Perception/score"]) == pytest.approx(
            utils.mme_aggregate_results(by_key["mme_perception_score"]), abs=1e-9
        )
        assert float(computed["Cognition/score"]) == pytest.approx(
            utils.mme_aggregate_results(by_key["mme_cognition_score"]), abs=1e-9
        )
        for q, reading in zip(questions, result["readings"], strict=True):
            official = utils.parse_pred_ans(replies[q.id].strip())
            assert reading == (None if official == "other" else official), replies[q.id]


def test_mme_acc_and_acc_plus_by_hand(tmp_path: Path) -> None:
    """One subtask, two images: image 1 both right, image 2 one right -> acc 75, acc+ 50, score 125."""
    root = tmp_path / "mme"
    for i in (1, 2):
        write_image(root / "count" / f"{i}.jpg")
        (root / "count" / f"{i}.txt").write_text(
            "Two? Please answer yes or no.\tYes\nThree? Please answer yes or no.\tNo\n"
        )
    replies = {"count-1-0": "Yes", "count-1-1": "No", "count-2-0": "Yes", "count-2-1": "Yes"}
    _, result = evaluate("mme", replies, root=root, split="test")
    assert {k: float(v) for k, v in result["computed"].items() if k.startswith("count/")} == {
        "count/acc": 75.0, "count/acc_plus": 50.0, "count/score": 125.0
    }  # fmt: skip
    predictions = write_predictions(tmp_path / "p.jsonl", replies)
    main(["convert", "mme", "--root", str(root), "--out", str(tmp_path / "out"), "--json-only"])
    assert [r["image"] for r in json.loads((tmp_path / "out" / "mme_test.json").read_text())] == [
        "count/1.jpg", "count/1.jpg", "count/2.jpg", "count/2.jpg"
    ]  # fmt: skip
    main(["score", "mme", "--root", str(root), "--predictions", str(predictions), "--out", str(tmp_path / "r")])
    rows = json.loads((tmp_path / "r" / "report.json").read_text())["rows"]
    assert rows["Perception"] == {"score": 125.0} and rows["Cognition"] == {"score": None}


def test_mme_needs_two_questions_per_image(tmp_path: Path) -> None:
    write_image(tmp_path / "count" / "1.jpg")
    (tmp_path / "count" / "1.txt").write_text("Two?\tYes\n")
    with pytest.raises(ValueError, match=r"1.txt: MME has two 'question<TAB>answer' lines per image"):
        evaluate("mme", {}, root=tmp_path, split="test")
