"""ScienceQA scoring: the paper's per-category table for known predictions, computed by hand;
the metric across processes; the command line."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from test_scienceqa_release import write_release

from src.eval.scienceqa import main, score
from src.eval.scienceqa_data import CATEGORIES
from src.eval.scienceqa_metric import FAILED_BIT, MISSING_BIT, ScienceQAAccuracy, category_mask

# Test split (see test_scienceqa_release): pid -> truth, columns
#   1 A  NAT IMG G1-6        5 A  LAN NO G1-6
#   2 B  NAT TXT G7-12       6 E  LAN TXT G7-12
#   3 C  SOC NO G1-6         7 D  NAT IMG G1-6
#   4 B  SOC TXT IMG G7-12   8 A  SOC NO G7-12
PREDICTIONS = {
    "1": "A",  # right
    "2": "B. Basalt forms from lava.",  # right
    "3": "The answer is A.",  # wrong
    "4": "The answer is B.",  # right
    "5": "I think it is A",  # failure: no option read
    "6": "E",  # right
    # "7": missing
    "8": "The answer is A. The answer is B.",  # failure: two answers
    "9": "A",  # a train pid: extra, ignored
}
# right: 1 2 4 6
EXPECTED = {
    "NAT": 66.67,  # 1 2 7 -> 2/3
    "SOC": 33.33,  # 3 4 8 -> 1/3
    "LAN": 50.00,  # 5 6 -> 1/2
    "TXT": 100.00,  # 2 4 6 -> 3/3
    "IMG": 66.67,  # 1 4 7 -> 2/3
    "NO": 0.00,  # 3 5 8 -> 0/3
    "G1-6": 25.00,  # 1 3 5 7 -> 1/4
    "G7-12": 75.00,  # 2 4 6 8 -> 3/4
    "Avg": 50.00,  # 4/8
}


def write_predictions(path, predictions: dict[str, str], model: str = "tiny-llava") -> None:
    rows = [
        {"id": pid, "prompt": "...", "answer": text, "reference": None, "model": model, "settings": {}}
        for pid, text in predictions.items()
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_known_predictions_give_the_hand_computed_table(tmp_path):
    root = write_release(tmp_path / "sqa")
    preds = tmp_path / "preds.jsonl"
    write_predictions(preds, PREDICTIONS)
    text = score(root, "test", preds, tmp_path / "report")
    report = json.loads((tmp_path / "report/report.json").read_text())
    assert report["scores"] == EXPECTED
    assert report["method"] == "tiny-llava"
    assert report["counts"] == {
        "all": 8, "NAT": 3, "SOC": 3, "LAN": 2, "TXT": 3, "IMG": 3, "NO": 3, "G1-6": 4, "G7-12": 4,
        "failed": 2, "missing": 1,
    }  # fmt: skip
    assert report["failures"] == [
        {"id": "5", "answer": "I think it is A"},
        {"id": "8", "answer": "The answer is A. The answer is B."},
    ]
    assert report["missing"] == ["7"] and report["extra"] == ["9"]
    lines = text.splitlines()
    assert lines[0] == "| Method | NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 | Avg |"
    assert lines[2] == "| tiny-llava | 66.67 | 33.33 | 50.00 | 100.00 | 66.67 | 0.00 | 25.00 | 75.00 | 50.00 |"
    assert "- failures (no option letter read, counted wrong): 2" in lines
    assert "- missing predictions (counted wrong): 1, e.g. 7" in lines
    assert "- predictions for ids outside the split (ignored): 1" in lines
    per_question = [json.loads(line) for line in (tmp_path / "report/per_question.jsonl").read_text().splitlines()]
    assert [(q["id"], q["read"], q["correct"]) for q in per_question] == [
        ("1", "A", True), ("2", "B", True), ("3", "A", False), ("4", "B", True),
        ("5", None, False), ("6", "E", True), ("7", None, False), ("8", None, False),
    ]  # fmt: skip
    assert (tmp_path / "report/report.md").read_text() == text


def test_llava_s_own_answer_files_score_the_same(tmp_path):
    root = write_release(tmp_path / "sqa")
    preds = tmp_path / "llava.jsonl"
    preds.write_text("".join(json.dumps({"question_id": k, "text": v}) + "\n" for k, v in PREDICTIONS.items()))
    score(root, "test", preds, tmp_path / "report", method="LLaVA")
    report = json.loads((tmp_path / "report/report.json").read_text())
    assert report["scores"] == EXPECTED and report["method"] == "LLaVA"


def test_the_command_line_converts_and_scores(tmp_path, capsys):
    root = write_release(tmp_path / "sqa")
    main(["convert", "--root", str(root), "--split", "test", "--format", "QCM-LEA", "--out", str(tmp_path / "shards")])
    assert "8 samples (3 with an image, 5 text-only) in 1 shards" in capsys.readouterr().out
    assert (tmp_path / "shards/scienceqa_test_QCM-LEA-000000.tar").is_file()
    preds = tmp_path / "preds.jsonl"
    write_predictions(preds, {pid: "The answer is A." for pid in "12345678"})  # right: 1 5 8
    main(["score", "--root", str(root), "--predictions", str(preds), "--out", str(tmp_path / "r"), "--method", "all-A"])
    out = capsys.readouterr().out
    assert "| all-A | 33.33 | 33.33 | 50.00 | 0.00 | 33.33 | 66.67 | 50.00 | 25.00 | 37.50 |" in out
    with pytest.raises(SystemExit):
        main(["score", "--root", str(tmp_path), "--predictions", str(preds), "--out", str(tmp_path / "r")])
    assert "problems.json not found" in capsys.readouterr().err


# ---------------------------------------------------------------- the metric across processes

MASKS = [
    category_mask(["NAT", "IMG", "G1-6"]),
    category_mask(["NAT", "TXT", "G7-12"]),
    category_mask(["SOC", "NO", "G1-6"]) | FAILED_BIT,
    category_mask(["SOC", "TXT", "IMG", "G7-12"]),
    category_mask(["LAN", "NO", "G1-6"]) | MISSING_BIT,
    category_mask(["LAN", "TXT", "G7-12"]),
]
PREDICTED = [0, 1, -1, 0, -1, 4]
ANSWER = [0, 1, 2, 1, 0, 4]  # right: 0 1 5


def _values(result: dict) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in result.items()}


def single_process() -> dict[str, float]:
    metric = ScienceQAAccuracy()
    metric.update(torch.tensor(PREDICTED), torch.tensor(ANSWER), torch.tensor(MASKS))
    return _values(metric.compute())


def test_the_metric_counts_every_column_and_a_missing_prediction():
    values = single_process()
    assert values["Avg"] == round(3 / 6, 6)
    assert {name: values[name] for name in CATEGORIES} == {
        "NAT": 1.0, "SOC": 0.0, "LAN": 0.5, "TXT": round(2 / 3, 6), "IMG": 0.5, "NO": 0.0, "G1-6": round(1 / 3, 6),
        "G7-12": round(2 / 3, 6),
    }  # fmt: skip
    assert values["count/all"] == 6 and values["count/failed"] == 1 and values["count/missing"] == 1
    assert values["count/TXT"] == 3 and values["count/NO"] == 2
    with pytest.raises(ValueError, match=r"unknown ScienceQA categories \['TEXT'\]"):
        category_mask(["TEXT"])


def test_an_empty_column_is_nan_not_zero():
    metric = ScienceQAAccuracy()
    metric.update(torch.tensor([1]), torch.tensor([1]), torch.tensor([category_mask(["NAT", "NO", "G1-6"])]))
    result = metric.compute()
    assert result["NAT"] == 1.0 and torch.isnan(result["SOC"]) and result["count/SOC"] == 0


def test_states_merged_as_ranks_gather_them_give_the_single_process_result():
    """Each rank's list states, concatenated over ranks as torchmetrics' `cat` sync does, with
    the split uneven (one rank holds a question only its columns have)."""
    ranks = [ScienceQAAccuracy(), ScienceQAAccuracy()]
    for rank, rows in ((0, [0, 1, 2, 3, 4]), (1, [5])):
        for row in rows:
            ranks[rank].update(torch.tensor([PREDICTED[row]]), torch.tensor([ANSWER[row]]), torch.tensor([MASKS[row]]))
    merged = ranks[0]
    merged.correct = torch.cat([torch.cat(m.correct) for m in ranks])
    merged.mask = torch.cat([torch.cat(m.mask) for m in ranks])
    assert _values(merged.compute()) == single_process()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metric = ScienceQAAccuracy()
        rows = [0, 1, 2, 3, 4] if rank == 0 else [5]  # uneven on purpose
        metric.update(
            torch.tensor([PREDICTED[r] for r in rows]),
            torch.tensor([ANSWER[r] for r in rows]),
            torch.tensor([MASKS[r] for r in rows]),
        )
        queue.put((rank, _values(metric.compute())))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_give_the_single_process_table():
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_rank_main, args=(rank, 2, port, queue)) for rank in range(2)]
    for process in processes:
        process.start()
    results = dict(queue.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    expected = single_process()
    assert results[0] == expected and results[1] == expected
