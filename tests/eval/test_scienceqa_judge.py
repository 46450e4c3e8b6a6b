"""The paper's judge ensemble on ScienceQA, against a real Chat Completions server on loopback."""

from __future__ import annotations

import json
import re

import pytest
from chat_server import ChatServer
from test_scienceqa import PREDICTIONS, write_predictions
from test_scienceqa_release import write_release

from src.eval.scienceqa import main, score

# the judge's first answer per question, and its final answer when shown both answers
FIRST = {
    "1": "The answer is A.",  # agrees with the model (A, right)
    "2": "Granite is igneous. The answer is A.",  # model B (right) -> arbitration picks B
    "3": "The answer is C.",  # model A (wrong) -> arbitration picks C (right)
    "4": "I cannot see the map, so I cannot answer.",  # no answer: the model's B stands (right)
    "5": "The answer is A.",  # the model's reply named no option -> arbitration picks A (right)
    "6": "The answer is A.",  # model E (right) -> arbitration names nothing: the model's E stands
    "8": "The answer is A.",  # model failed -> arbitration picks B (wrong)
}
FINAL = {"2": "Answer 1 is right. The answer is B.", "3": "The answer is C.", "5": "The answer is A.",
         "6": "Both could be right.", "8": "The answer is B."}  # fmt: skip


def respond(request: dict) -> str:
    text = request["messages"][-1]["content"]
    pid = re.search(r"fits question (\d+)\?", text).group(1)
    return FINAL[pid] if "[Answer 1]" in text else FIRST[pid]


def test_the_judge_settles_disagreements_and_the_report_gains_a_row(tmp_path):
    root = write_release(tmp_path / "sqa")
    preds = tmp_path / "preds.jsonl"
    write_predictions(preds, PREDICTIONS)
    # the first request fails once (a 500): the client retries it, the result is the same
    with ChatServer(respond, faults={0: "500"}) as server:
        config = tmp_path / "judge.yaml"
        config.write_text(
            f"base_url: {server.url}\nmodel: judge-llm\napi_key_env: null\nbackoff_initial_s: 0.01\nmax_concurrency: 3\n"
        )
        text = score(root, "test", preds, tmp_path / "report", judge=config)
        requests = server.requests
    assert len(requests) == 7 + 5 + 1  # one answer per answered question, five arbitrations, one retry
    arbitration = next(r for r in requests if "fits question 2?" in r["messages"][-1]["content"] and "[Answer 1]"
                       in r["messages"][-1]["content"])  # fmt: skip
    content = arbitration["messages"][-1]["content"]
    assert "[Answer 1]\nB. Basalt forms from lava.\n[End of Answer 1]" in content  # the model's own reply
    assert "[Answer 2]\nGranite is igneous. The answer is A.\n[End of Answer 2]" in content
    assert "<image>" not in content and "Options: (A) granite (B) basalt (C) marble" in content
    report = json.loads((tmp_path / "report/report.json").read_text())
    judge = report["judge"]
    # ensemble right: 1 2 3 4 5 6; wrong: 7 (missing, never asked) and 8
    assert judge["scores"] == {
        "NAT": 66.67, "SOC": 66.67, "LAN": 100.0, "TXT": 100.0, "IMG": 66.67, "NO": 66.67, "G1-6": 75.0,
        "G7-12": 75.0, "Avg": 75.0,
    }  # fmt: skip
    assert judge["routes"] == {
        "agree": 1, "arbitrated": 4, "judge_no_answer": 1, "arbitration_no_answer": 1, "judge_error": 0,
        "arbitration_error": 0,
    }  # fmt: skip
    assert judge["usage"]["retries"] == 1
    assert report["scores"]["Avg"] == 50.0  # the model's own row is unchanged
    lines = text.splitlines()
    assert (
        lines[3]
        == "| tiny-llava + judge (judge-llm) | 66.67 | 66.67 | 100.00 | 100.00 | 66.67 | 66.67 | 75.00 | 75.00 | 75.00 |"
    )
    outcomes = {
        json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "report/judge.jsonl").read_text().splitlines()
    }
    assert set(outcomes) == set(FIRST)
    assert outcomes["6"] | {"judge_reply": None, "arbitration_reply": None} == {
        "id": "6", "model": "E", "judge": "A", "final": "E", "route": "arbitration_no_answer",
        "judge_reply": None, "arbitration_reply": None,
    }  # fmt: skip
    assert outcomes["5"]["model"] is None and outcomes["5"]["final"] == "A"


def test_a_judge_that_cannot_be_reached_leaves_the_model_s_answers(tmp_path):
    root = write_release(tmp_path / "sqa")
    preds = tmp_path / "preds.jsonl"
    write_predictions(preds, {"1": "A", "2": "C"})
    with ChatServer(lambda request: "The answer is B.", faults=lambda n, r: "503") as server:
        config = tmp_path / "judge.yaml"
        config.write_text(
            f"client:\n  base_url: {server.url}\n  model: j\n  api_key_env: null\n  max_retries: 1\n"
            "  backoff_initial_s: 0.01\n"
        )
        score(root, "test", preds, tmp_path / "report", judge=config)
    judge = json.loads((tmp_path / "report/report.json").read_text())["judge"]
    assert judge["routes"]["judge_error"] == 2 and judge["scores"]["Avg"] == 12.5  # pid 1 right, of 8
    assert judge["counts"]["missing"] == 6


def test_a_judge_without_its_key_is_a_usage_error_before_any_request(tmp_path, capsys):
    root = write_release(tmp_path / "sqa")
    preds = tmp_path / "preds.jsonl"
    write_predictions(preds, {"1": "A"})
    with ChatServer(lambda request: "The answer is A.") as server:
        config = tmp_path / "judge.yaml"
        config.write_text(f"base_url: {server.url}\napi_key_env: NO_SUCH_SQA_JUDGE_KEY\n")
        with pytest.raises(SystemExit):
            main(["score", "--root", str(root), "--predictions", str(preds), "--out", str(tmp_path / "r"),
                  "--judge", str(config)])  # fmt: skip
        assert server.requests == []
    assert "NO_SUCH_SQA_JUDGE_KEY (api_key_env) is not set" in capsys.readouterr().err
