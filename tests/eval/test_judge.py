"""src.eval.judge: LLaVA-Bench-style relative score against a real loopback Chat Completions
server whose reviews are scripted (some unreadable at first, one never readable)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from chat_server import ChatServer

from src.eval.judge import context_text, main, parse_scores

QUESTIONS = [
    {"question_id": 1, "image": "a.jpg", "text": "What is the man holding?", "category": "conv"},
    {"question_id": 2, "image": "a.jpg", "text": "What colour is the kite?", "category": "conv"},
    {"question_id": 3, "image": "b.jpg", "text": "Describe the image in detail.", "category": "detail"},
    {"question_id": 4, "image": "c.jpg", "text": "Describe the scene.", "category": "llava_bench_detail"},
    {"question_id": 5, "image": "b.jpg", "text": "Why might the road be wet?", "category": "complex"},
    {"question_id": 6, "image": "c.jpg", "text": "What might happen next?", "category": "complex_reasoning"},
    {"question_id": 7, "image": "a.jpg", "text": "Is it windy?", "category": "conversation"},
]
CONTEXT = [
    {"image": "a.jpg", "captions": ["A man flies a kite.", "A red kite over a beach."],
     "instances": [{"category": "person", "bbox": [0.1, 0.25, 0.5, 0.9]}, {"category": "kite", "bbox": [0.6, 0.1, 0.7, 0.2]}]},
    {"image": "b.jpg", "caption": "A street after the rain."},  # LLaVA-Bench in-the-wild: one caption string
    {"id": "c.jpg", "caption": "Children at a crossing.", "boxes": ["child: [0.2, 0.5, 0.3, 0.9]"]},
]  # fmt: skip
# the judge's replies per question, in order; the last one repeats
REVIEWS = {
    "What is the man holding?": ["8 6\nAssistant 2 missed the kite's colour."],
    "What colour is the kite?": ["Assistant 1 was better.", "9, 9\nBoth are right."],
    "Describe the image in detail.": ["Score: 8/10 and 4/10\nThe second invents a car."],
    "Describe the scene.": ["I refuse to give numbers."],
    "Why might the road be wet?": ["(10, 7)\nGood reasoning from both."],
    "What might happen next?": [
        "Scores: ten and eight",
        "garbled",
        "Assistant 1: 6\nAssistant 2: 3\nThe second is vague.",
    ],
}


def write_inputs(folder):
    def jsonl(name, rows):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return folder / name

    questions = jsonl("questions.jsonl", QUESTIONS)
    context = jsonl("context.jsonl", CONTEXT)
    references = jsonl(
        "answers_gpt4.jsonl", [{"question_id": q["question_id"], "text": f"ref {q['question_id']}"} for q in QUESTIONS]
    )
    answers = jsonl("preds.jsonl", [
        {"id": str(q["question_id"]), "prompt": q["text"], "answer": f"model {q['question_id']}", "reference": None,
         "model": "tiny-llava", "settings": {}} for q in QUESTIONS[:6]
    ])  # fmt: skip
    return questions, context, references, answers


class Scripted:
    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()

    def __call__(self, request: dict) -> str:
        content = request["messages"][-1]["content"]
        question = content.split("[Question]\n", 1)[1].split("\n", 1)[0]
        replies = REVIEWS[question]
        reply = replies[min(self.seen[question], len(replies) - 1)]
        self.seen[question] += 1
        return reply


def test_relative_scores_retries_and_unreadable_reviews(tmp_path, capsys):
    questions, context, references, answers = write_inputs(tmp_path)
    responder = Scripted()
    with ChatServer(responder, faults={2: "429"}) as server:
        judge = tmp_path / "judge.yaml"
        judge.write_text(f"base_url: {server.url}\nmodel: judge-llm\napi_key_env: null\nbackoff_initial_s: 0.01\n")
        main([
            "--questions", str(questions), "--context", str(context), "--references", str(references),
            "--answers", str(answers), "--judge", str(judge), "--out", str(tmp_path / "out"),
        ])  # fmt: skip
        requests = server.requests
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["scores"] == {
        "conv": {"n": 2, "reference_mean": 8.5, "model_mean": 7.5, "relative": 88.2},  # (8,6) (9,9)
        "detail": {"n": 1, "reference_mean": 8.0, "model_mean": 4.0, "relative": 50.0},  # (8,4); q4 unreadable
        "complex": {"n": 2, "reference_mean": 8.0, "model_mean": 5.0, "relative": 62.5},  # (10,7) (6,3)
        "all": {"n": 5, "reference_mean": 8.2, "model_mean": 5.8, "relative": 70.7},
    }
    # re-asked: q2 once, q4 twice (then given up), q6 twice; plus one 429 the client retried
    assert report["retries"] == 5
    assert responder.seen == {"What is the man holding?": 1, "What colour is the kite?": 2,
                              "Describe the image in detail.": 1, "Describe the scene.": 3,
                              "Why might the road be wet?": 1, "What might happen next?": 3}  # fmt: skip
    assert len(requests) == 11 + 1 and report["usage"]["retries"] == 1
    assert report["unreadable"] == [
        {"question_id": "4", "category": "detail", "error": "unreadable", "replies": ["I refuse to give numbers."] * 3}
    ]
    assert report["unscored"] == {"no_answer": ["7"], "no_reference": [], "no_context": []}
    assert report["reviewed"] == 5 and report["questions"] == 7 and report["method"] == "tiny-llava"
    # what the judge saw: LLaVA's layout, answer 1 the reference, the category's rubric
    first = next(r for r in requests if "What is the man holding?" in r["messages"][-1]["content"])
    system, user = first["messages"]
    assert system["role"] == "system" and "precise assistant" in system["content"]
    assert user["content"].startswith(
        "[Context]\nA man flies a kite.\nA red kite over a beach.\n\nperson: [0.1, 0.25, 0.5, 0.9]\nkite: [0.6, 0.1, 0.7, 0.2]"
        "\n\n[Question]\nWhat is the man holding?\n\n[Assistant 1]\nref 1\n\n[End of Assistant 1]\n\n"
        "[Assistant 2]\nmodel 1\n\n[End of Assistant 2]\n\n[System]\n"
    )
    assert "conversational question" in user["content"]
    scene = next(r for r in requests if "Describe the scene." in r["messages"][-1]["content"])["messages"][1]["content"]
    assert "child: [0.2, 0.5, 0.3, 0.9]" in scene and "detailed-description request" in scene
    reviews = [json.loads(line) for line in (tmp_path / "out/reviews.jsonl").read_text().splitlines()]
    assert [(r["question_id"], r["tuple"], r["attempts"]) for r in reviews] == [
        ("1", [8.0, 6.0], 1), ("2", [9.0, 9.0], 2), ("3", [8.0, 4.0], 1), ("4", [-1, -1], 3),
        ("5", [10.0, 7.0], 1), ("6", [6.0, 3.0], 3),
    ]  # fmt: skip
    markdown = (tmp_path / "out/report.md").read_text()
    assert "| relative score (%) | 88.2 | 50.0 | 62.5 | 70.7 |" in markdown
    assert "- not scored, no model answer (1): 7" in markdown
    assert '4 (detail, 3 replies): last reply: "I refuse to give numbers."' in markdown
    assert markdown == capsys.readouterr().out


@pytest.mark.parametrize(
    ("review", "scores"),
    [
        ("8 6", (8, 6)),
        ("8, 6\nexplanation", (8, 6)),
        ("Score: 8/10 and 6/10", (8, 6)),
        ("**7.5 9**", (7.5, 9)),
        ("[10, 1]", (10, 1)),
        ("Assistant 1: 8, Assistant 2: 6", (8, 6)),
        ("Assistant 1: 8\nAssistant 2: 6", (8, 6)),
        ("Assistant 1 receives 8 out of 10, Assistant 2 receives 6 out of 10.", (8, 6)),
        ("Scores:\n9 7", (9, 7)),
        ("8\n6", None),  # one number on the first line, no labels: not guessed
        ("8 6 7", None),
        ("0 5", None),  # out of the 1-10 scale
        ("11 5", None),
        ("I cannot judge this.", None),
        ("", None),
    ],
)
def test_scores_are_read_leniently_but_never_guessed(review, scores):
    assert parse_scores(review) == scores


def test_context_in_either_layout():
    assert context_text(CONTEXT[1]) == "A street after the rain."
    assert context_text({"image": "x", "captions": [], "instances": []}) == ""


def test_an_unknown_category_or_a_missing_key_fails_before_any_request(tmp_path, capsys):
    questions, context, references, answers = write_inputs(tmp_path)
    with ChatServer(lambda request: "8 6") as server:
        judge = tmp_path / "judge.yaml"
        judge.write_text(f"base_url: {server.url}\napi_key_env: null\n")
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(QUESTIONS[0] | {"category": "ocr"}) + "\n")
        args = ["--context", str(context), "--references", str(references), "--answers", str(answers),
                "--out", str(tmp_path / "out")]  # fmt: skip
        with pytest.raises(SystemExit):
            main(["--questions", str(bad), "--judge", str(judge), *args])
        assert (
            "unknown question category 'ocr'; the rubrics are ['conv', 'detail', 'complex']" in capsys.readouterr().err
        )
        keyed = tmp_path / "keyed.yaml"
        keyed.write_text(f"base_url: {server.url}\napi_key_env: NO_SUCH_JUDGE_KEY_VARIABLE\n")
        with pytest.raises(SystemExit):
            main(["--questions", str(questions), "--judge", str(keyed), *args])
        assert "NO_SUCH_JUDGE_KEY_VARIABLE (api_key_env) is not set" in capsys.readouterr().err
        typo = tmp_path / "typo.yaml"
        typo.write_text(f"base_url: {server.url}\ntemprature: 0\n")
        with pytest.raises(SystemExit):
            main(["--questions", str(questions), "--judge", str(typo), *args])
        assert f"{typo}: Option 'temprature' is not accepted" in capsys.readouterr().err
        assert server.requests == []


def test_prepare_writes_predict_s_llava_json(tmp_path, capsys):
    questions, _, references, _ = write_inputs(tmp_path)
    main(["prepare", "--questions", str(questions), "--references", str(references), "--out", str(tmp_path / "b.json")])
    assert "wrote 7 questions" in capsys.readouterr().out
    records = json.loads((tmp_path / "b.json").read_text())
    assert records[0] == {
        "id": "1",
        "image": "a.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is the man holding?"},
            {"from": "gpt", "value": "ref 1"},
        ],
    }
    assert [r["id"] for r in records] == [str(q["question_id"]) for q in QUESTIONS]


def test_the_example_judge_config_loads_and_names_no_key():
    from pathlib import Path

    from src.eval.judge import load_chat_config

    path = Path(__file__).parents[2] / "experiments/eval/judge.yaml"
    config = load_chat_config(path)
    assert config.base_url.startswith("https://") and config.api_key_env == "OPENAI_API_KEY"
    assert "sk-" not in path.read_text()


def test_an_unknown_judge_config_field_is_named(tmp_path):
    from src.eval.judge import load_chat_config

    path = tmp_path / "judge.yaml"
    path.write_text("model: m\ntemprature: 0.1\n")
    with pytest.raises(ValueError, match=r"judge.yaml: Option 'temprature' is not accepted$"):
        load_chat_config(path)
    path.write_text("model: m\nmax_retries: many\n")
    with pytest.raises(
        ValueError, match=r"judge.yaml: Parser key \"max_retries\": Expected a <class 'int'>. Got value: many$"
    ):
        load_chat_config(path)
    path.write_text("client:\n  model: from-section\n  timeout_s: 5\n")
    assert (load_chat_config(path).model, load_chat_config(path).timeout_s) == ("from-section", 5.0)
