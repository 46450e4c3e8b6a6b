"""POPE: the converter on a release in the official layout, and the scorer against lmms-eval's
`pope_process_results` + aggregations on the same replies, cell for cell."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from src.eval.__main__ import main
from tests.eval.bench_helpers import evaluate, pick, write_image, write_predictions
from tests.eval.lmms_reference import lmms_modules

SPLITS = ("adversarial", "popular", "random")
REPLIES = ["Yes", "No", "yes", "no", "Yes.", "No.", " yes\n", "NO", "Yes, there is a dog.", "There is no dog.",
           "maybe", "", "y", "Yes it is"]  # fmt: skip


def write_release(root: Path, per_split: int = 14) -> Path:
    """coco_pope_<split>.json files (one JSON object a line, POPE's layout) and two images."""
    images = ["COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg"]
    for number, image in enumerate(images):
        write_image(root / "val2014" / image, (number * 100, 50, 50))
    for s, split in enumerate(SPLITS):
        rows = [
            {"question_id": q + 1, "image": images[q % 2], "text": f" Is there a thing {q} in the image?",
             "label": "yes" if (q + s) % 3 else "no"}
            for q in range(per_split)
        ]  # fmt: skip
        (root / f"coco_pope_{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def lmms_scores(utils, docs: list[dict], replies: list[str]) -> dict[str, float]:
    # lmms-eval strips every generation before process_results (Task.process_results)
    results = [
        utils.pope_process_results(doc, [reply.strip()])["pope_accuracy"]
        for doc, reply in zip(docs, replies, strict=True)
    ]
    return {
        "accuracy": utils.pope_aggregate_accuracy(results),
        "precision": utils.pope_aggregate_precision(results),
        "recall": utils.pope_aggregate_recall(results),
        "f1": utils.pope_aggregate_f1_score(results),
        "truth_yes_ratio": utils.pope_aggregate_yes_ratio(results),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pope_equals_lmms_eval(tmp_path: Path, seed: int) -> None:
    root = write_release(tmp_path / "pope")
    with lmms_modules("tasks/pope/utils.py") as loaded:
        utils = loaded["tasks/pope/utils.py"]
        questions, _ = evaluate("pope", {}, root=root, split="all", images=None)
        replies = dict(zip([q.id for q in questions], pick(REPLIES, len(questions), seed), strict=True))
        questions, result = evaluate("pope", replies, root=root, split="all", images=None)
        computed = result["computed"]
        kwargs = {"pre_prompt": "", "post_prompt": "\nAnswer the question using a single word or phrase."}
        for split in (*SPLITS, "all"):
            chosen = [q for q in questions if split in (q.group, "all")]
            docs = []
            for q in chosen:
                line = json.loads(
                    (root / f"coco_pope_{q.group}.json").read_text().splitlines()[q.info["question_id"] - 1]
                )
                docs.append({"question_id": q.info["question_id"], "question": line["text"], "answer": line["label"]})
                assert q.prompt == utils.pope_doc_to_text(docs[-1], kwargs)
            reference = lmms_scores(utils, docs, [replies[q.id] for q in chosen])
            for name, value in reference.items():
                assert float(computed[f"{split}/{name}"]) == pytest.approx(value, abs=1e-12), (split, name)
            said_yes = sum(replies[q.id].strip().lower() == "yes" for q in chosen)
            assert float(computed[f"{split}/yes_ratio"]) == pytest.approx(said_yes / len(chosen), abs=1e-12)


def test_pope_convert_and_score_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_release(tmp_path / "pope", per_split=3)
    main(["convert", "pope", "--root", str(root), "--out", str(tmp_path / "out")])
    records = json.loads((tmp_path / "out" / "pope_all.json").read_text())
    assert [r["id"] for r in records] == [f"{s}-{n}" for s in SPLITS for n in (1, 2, 3)]
    assert records[0]["conversations"][0]["value"] == (
        "<image>\nIs there a thing 0 in the image?\nAnswer the question using a single word or phrase."
    )
    assert records[0]["image"] == "COCO_val2014_000000000001.jpg"
    assert (tmp_path / "out" / "pope_all-000000.tar").is_file()
    truth = {r["id"]: r["conversations"][1]["value"] for r in records}
    replies = dict(truth)
    replies["random-1"] = "Maybe"  # a failure
    del replies["random-2"]  # missing
    predictions = write_predictions(tmp_path / "preds.jsonl", replies)
    main(["score", "pope", "--root", str(root), "--predictions", str(predictions), "--out", str(tmp_path / "r")])
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["rows"]["adversarial"]["accuracy"] == 100.0
    assert report["rows"]["random"]["accuracy"] == round(100 / 3, 2)
    assert report["missing"] == ["random-2"] and report["failures"] == [{"id": "random-1", "answer": "Maybe"}]
    assert "| m (all) |" in capsys.readouterr().out


def test_pope_bad_label_is_a_clear_error(tmp_path: Path) -> None:
    root = write_release(tmp_path / "pope", per_split=1)
    (root / "coco_pope_random.json").write_text(
        json.dumps({"question_id": 1, "image": "x.jpg", "text": "q", "label": "perhaps"})
    )
    with pytest.raises(ValueError, match=r"coco_pope_random.json line 1: label 'perhaps' is not yes or no"):
        evaluate("pope", {}, root=root, split="all", images=None)
