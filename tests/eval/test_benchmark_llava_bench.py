"""LLaVA-Bench in the registry (`python -m src.eval convert|score llava_bench`) against
`python -m src.eval.judge` on the same files: the converter is `judge prepare`'s, and the score,
judged by a real loopback Chat Completions server with scripted reviews (re-asks and an unreadable
review included), is the judge command's, file for file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chat_server import ChatServer

from src.eval import judge
from src.eval.__main__ import main
from src.eval.benchmarks import get_benchmark
from tests.eval.bench_helpers import write_image
from tests.eval.test_judge import QUESTIONS, Scripted, write_inputs


def write_release(root: Path) -> tuple[Path, Path]:
    """An in-the-wild release folder (test_judge's questions, context and references under their
    official names, a few images) and the model's predictions (6 of the 7 questions answered)."""
    root.mkdir(parents=True, exist_ok=True)
    questions, context, references, answers = write_inputs(root)
    assert (questions.name, context.name, references.name) == ("questions.jsonl", "context.jsonl", "answers_gpt4.jsonl")
    for number, name in enumerate(sorted({q["image"] for q in QUESTIONS})):
        write_image(root / "images" / name, (40 * number, 90, 200))
    predictions = answers.rename(root.parent / "preds.jsonl")
    return root, predictions


def judge_yaml(path: Path, url: str) -> Path:
    path.write_text(f"base_url: {url}\nmodel: judge-llm\napi_key_env: null\nbackoff_initial_s: 0.01\n")
    return path


def test_convert_is_judge_prepare(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, _ = write_release(tmp_path / "bench")
    main(["convert", "llava_bench", "--root", str(root), "--out", str(tmp_path / "out")])
    line = capsys.readouterr().out
    records = json.loads((tmp_path / "out" / "llava_bench_wild.json").read_text())
    assert records == judge.to_llava(root / "questions.jsonl", root / "answers_gpt4.jsonl")
    assert records[0]["conversations"][-1] == {"from": "gpt", "value": "ref 1"} and len(records) == 7
    assert f"7 questions -> {tmp_path / 'out' / 'llava_bench_wild.json'}" in line
    assert "7 samples in 1 shards" in line and (tmp_path / "out" / "llava_bench_wild-000000.tar").is_file()
    # without the references file: the records have no gpt turn, and the summary says so
    (root / "answers_gpt4.jsonl").unlink()
    main(["convert", "llava_bench", "--root", str(root), "--out", str(tmp_path / "bare"), "--json-only"])
    assert "no reference answers (answers_gpt4.jsonl not in --root)" in capsys.readouterr().out
    bare = json.loads((tmp_path / "bare" / "llava_bench_wild.json").read_text())
    assert bare == judge.to_llava(root / "questions.jsonl") and len(bare[0]["conversations"]) == 1


def test_score_through_the_registry_is_the_judge_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, predictions = write_release(tmp_path / "bench")
    with ChatServer(Scripted()) as server:
        main([
            "score", "llava_bench", "--root", str(root), "--predictions", str(predictions),
            "--judge", str(judge_yaml(tmp_path / "judge.yaml", server.url)), "--out", str(tmp_path / "registry"),
        ])  # fmt: skip
        registry_requests = len(server.requests)
    printed = capsys.readouterr().out
    with ChatServer(Scripted()) as server:  # a fresh script: the same reviews, re-asks included
        judge.main([
            "--questions", str(root / "questions.jsonl"), "--context", str(root / "context.jsonl"),
            "--references", str(root / "answers_gpt4.jsonl"), "--answers", str(predictions),
            "--judge", str(judge_yaml(tmp_path / "judge2.yaml", server.url)), "--out", str(tmp_path / "judge"),
        ])  # fmt: skip
        assert len(server.requests) == registry_requests == 11
    assert printed == capsys.readouterr().out
    for name in ("report.md", "report.json", "reviews.jsonl"):
        assert (tmp_path / "registry" / name).read_text() == (tmp_path / "judge" / name).read_text(), name
    report = json.loads((tmp_path / "registry" / "report.json").read_text())
    # test_judge's numbers: (8,6) (9,9) | (8,4), q4 unreadable | (10,7) (6,3); q7 has no answer
    assert report["benchmark"] == "llava_bench" and report["columns"] == ["relative", "model_mean", "reference_mean"]
    assert report["rows"] == {
        "conv": {"relative": 88.2, "model_mean": 7.5, "reference_mean": 8.5},
        "detail": {"relative": 50.0, "model_mean": 4.0, "reference_mean": 8.0},
        "complex": {"relative": 62.5, "model_mean": 5.0, "reference_mean": 8.0},
        "all": {"relative": 70.7, "model_mean": 5.8, "reference_mean": 8.2},
    }
    assert {name: row["relative"] for name, row in report["rows"].items()} == {
        name: scores["relative"] for name, scores in report["scores"].items()
    }
    assert report["unscored"]["no_answer"] == ["7"] and [u["question_id"] for u in report["unreadable"]] == ["4"]
    # the sweep tables read the registry's layout of report.json
    from src.launch.sweep.results import bench_scores

    harvested = bench_scores(tmp_path / "registry", {})
    assert harvested["bench/llava_bench/all/relative"] == 70.7 and harvested["bench/llava_bench/conv/model_mean"] == 7.5
    assert len(harvested) == 12


def test_score_the_coco_split_and_named_files(tmp_path: Path) -> None:
    """`--split coco` reads LLaVA's qa90_* names; `--questions` & co. name files anywhere."""
    root, predictions = write_release(tmp_path / "bench")
    coco = tmp_path / "coco"
    coco.mkdir()
    (root / "questions.jsonl").rename(coco / "qa90_questions.jsonl")
    (root / "context.jsonl").rename(coco / "caps_boxes_coco2014_val_80.jsonl")
    (root / "answers_gpt4.jsonl").rename(coco / "qa90_gpt4_answer.jsonl")
    with ChatServer(lambda request: "8 4") as server:
        config = str(judge_yaml(tmp_path / "judge.yaml", server.url))
        common = ["--predictions", str(predictions), "--judge", config]
        main(["score", "llava_bench", "--root", str(coco), "--split", "coco", *common, "--out", str(tmp_path / "a")])
        main([
            "score", "llava_bench", "--root", str(tmp_path / "nowhere"), "--questions", str(coco / "qa90_questions.jsonl"),
            "--context", str(coco / "caps_boxes_coco2014_val_80.jsonl"), "--references",
            str(coco / "qa90_gpt4_answer.jsonl"), *common, "--out", str(tmp_path / "b"),
        ])  # fmt: skip
    for out in ("a", "b"):
        report = json.loads((tmp_path / out / "report.json").read_text())
        assert report["rows"]["all"] == {"relative": 50.0, "model_mean": 4.0, "reference_mean": 8.0}
        assert report["reviewed"] == 6


def test_no_judge_or_no_release_is_a_clear_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, predictions = write_release(tmp_path / "bench")
    args = ["score", "llava_bench", "--root", str(root), "--predictions", str(predictions), "--out", str(tmp_path / "o")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "llava_bench: LLaVA-Bench is scored by a judge LLM: pass --judge JUDGE.yaml" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with ChatServer(lambda request: "8 6") as server:
        keyed = tmp_path / "keyed.yaml"
        keyed.write_text(f"base_url: {server.url}\napi_key_env: NO_SUCH_JUDGE_KEY_VARIABLE\n")
        with pytest.raises(SystemExit):
            main([*args, "--judge", str(keyed)])  # the client's ChatError, as a usage error
        assert "llava_bench: environment variable NO_SUCH_JUDGE_KEY_VARIABLE" in capsys.readouterr().err
        config = str(judge_yaml(tmp_path / "judge.yaml", server.url))
        with pytest.raises(SystemExit):
            main([*args[:3], str(tmp_path), *args[4:], "--judge", config])
        err = capsys.readouterr().err
        assert f"{tmp_path / 'questions.jsonl'} not found: --root must hold LLaVA-Bench's questions.jsonl" in err
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"image": "a.jpg", "text": "no id", "category": "conv"}\n')
        with pytest.raises(SystemExit):
            main(["convert", "llava_bench", "--root", str(root), "--questions", str(bad), "--out", str(tmp_path / "c")])
        assert "question 1 (in file order) needs a question_id and a text" in capsys.readouterr().err
        assert server.requests == []


def test_benchmark_eval_refuses_it_when_configured() -> None:
    """A judge per question on every rank at every evaluation is not run during training: the
    callback says so at construction, before any training step."""
    from src.training.bench_callback import BenchmarkEval

    with pytest.raises(ValueError, match="benchmark 'llava_bench' is scored by its own scorer only"):
        BenchmarkEval([{"name": "llava_bench", "root": "x", "judge": "experiments/eval/judge.yaml"}])
    benchmark = get_benchmark("llava_bench")
    assert benchmark.answer_kind == "judged" and benchmark.default_split == "wild"
