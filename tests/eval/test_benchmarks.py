"""The benchmark registry and CLI, the contract of every member, and the metrics across
processes: two real gloo ranks, each scoring every other question (so MME's pairs and
MMBench's rotations are split between ranks), give the single-process numbers exactly."""

from __future__ import annotations

import argparse
import multiprocessing
import queue as queues
import time
from pathlib import Path

import pytest
import torch

from src.eval.__main__ import main
from src.eval.benchmarks import BENCHMARKS, Benchmark, get_benchmark
from src.eval.benchmarks.base import ANSWER_KINDS, register_benchmark, sample_id
from tests.eval import test_benchmark_mmbench, test_benchmark_mme, test_benchmark_pope, test_benchmark_vqa

EXPECTED = ["gqa", "llava_bench", "mmbench", "mme", "pope", "scienceqa", "textvqa"]


def test_help_lists_every_benchmark(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert BENCHMARKS.names() == EXPECTED
    for name in EXPECTED:
        assert f"\n  {name} " in text
    with pytest.raises(SystemExit):
        main(["score", "mmlu", "--root", "x"])
    assert "invalid choice: 'mmlu'" in capsys.readouterr().err


@pytest.mark.parametrize("name", EXPECTED)
def test_every_member_keeps_the_contract(name: str) -> None:
    cls = BENCHMARKS.get(name)
    assert issubclass(cls, Benchmark) and cls.name == name
    assert cls.answer_kind in ANSWER_KINDS and cls.title and cls.release and cls.default_split
    for command in ("convert", "score"):
        parser = argparse.ArgumentParser()
        cls.add_arguments(parser, command)
        assert parser.parse_args(["--root", "r"]).split == cls.default_split


def test_registry_refuses_a_duplicate_and_a_bad_kind() -> None:
    with pytest.raises(ValueError, match="benchmark 'pope' registered twice"):
        register_benchmark(type("Again", (Benchmark,), {"name": "pope", "answer_kind": "yes_no"}))
    with pytest.raises(ValueError, match="answer_kind 'essay' is not one of"):
        register_benchmark(type("Essay", (Benchmark,), {"name": "essay", "answer_kind": "essay"}))
    with pytest.raises(ValueError, match="unknown benchmark 'vqa'; choose one of"):
        get_benchmark("vqa")


def test_ids_are_shard_keys() -> None:
    assert sample_id("existence", "000.jpg", 1) == "existence-000_jpg-1"
    with pytest.raises(ValueError, match="longer than 64"):
        sample_id("x" * 70)


def test_a_missing_release_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["score", "pope", "--root", str(tmp_path), "--predictions", "p", "--out", str(tmp_path / "o")])
    assert "coco_pope_adversarial.json not found" in capsys.readouterr().err


def _releases(tmp_path: Path) -> dict[str, argparse.Namespace]:
    return {
        "pope": argparse.Namespace(root=test_benchmark_pope.write_release(tmp_path / "pope"), split="all", images=None),
        "mme": argparse.Namespace(root=test_benchmark_mme.write_release(tmp_path / "mme"), split="test"),
        "mmbench": argparse.Namespace(
            root=test_benchmark_mmbench.write_tsv(tmp_path / "mmb.tsv", rotated=False), split="dev"
        ),
        "gqa": argparse.Namespace(root=test_benchmark_vqa.write_gqa(tmp_path / "gqa"), split="testdev", images=None),
        "textvqa": argparse.Namespace(root=test_benchmark_vqa.write_textvqa(tmp_path / "t"), split="val", images=None),
    }


def _scored(name: str, args: argparse.Namespace, rank: int | None, world: int) -> dict[str, float]:
    benchmark = get_benchmark(name)
    questions = benchmark.load(args).questions
    replies = [["Yes", "no", "B", "red", "2", "maybe"][i % 6] for i in range(len(questions))]
    readings = [benchmark.read(reply, q) for reply, q in zip(replies, questions, strict=True)]
    metric = benchmark.metric(questions)
    mine = range(len(questions)) if rank is None else range(rank, len(questions), world)
    benchmark.update(metric, [questions[i] for i in mine], [readings[i] for i in mine])
    return {key: float(value) for key, value in metric.compute().items()}


def _rank_main(rank: int, world: int, init_file: str, releases: dict, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        queue.put((rank, {name: _scored(name, args, rank, world) for name, args in releases.items()}))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as error:  # report, so the test fails with the reason and not a timeout
        queue.put((rank, repr(error)))


@pytest.mark.slow
def test_metrics_across_two_gloo_ranks_equal_one_process(tmp_path: Path) -> None:
    releases = _releases(tmp_path)
    single = {name: _scored(name, args, None, 1) for name, args in releases.items()}
    context = multiprocessing.get_context("fork")
    results: dict = {}
    done = context.Queue()
    processes = [
        context.Process(target=_rank_main, args=(rank, 2, str(tmp_path / "rendezvous"), releases, done))
        for rank in range(2)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + 90
    try:
        while len(results) < 2 and time.monotonic() < deadline:
            try:
                rank, result = done.get(timeout=0.5)
                results[rank] = result
            except queues.Empty:
                if all(not p.is_alive() for p in processes) and done.empty():
                    break
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
    for rank in range(2):
        assert isinstance(results.get(rank), dict), results
        for name, values in single.items():
            assert results[rank][name].keys() == values.keys(), name
            for key, value in values.items():
                assert results[rank][name][key] == pytest.approx(value, abs=1e-12, nan_ok=True), (rank, name, key)


def test_scienceqa_through_the_registry_is_the_existing_scorer(tmp_path: Path) -> None:
    from src.eval.scienceqa import score
    from tests.eval.test_scienceqa_release import write_release

    root = write_release(tmp_path / "sqa")
    main(["convert", "scienceqa", "--root", str(root), "--split", "test", "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "llava_test_CQM-A.json").is_file()
    predictions = tmp_path / "p.jsonl"
    predictions.write_text('{"id": "1", "answer": "A"}\n{"id": "2", "answer": "The answer is C."}\n')
    main(["score", "scienceqa", "--root", str(root), "--predictions", str(predictions), "--out", str(tmp_path / "a")])
    expected = score(root, "test", predictions, tmp_path / "b")
    assert (tmp_path / "a" / "report.md").read_text() == expected
