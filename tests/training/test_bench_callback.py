"""BenchmarkEval (src/training/bench_callback.py): benchmarks of the registry scored during fit.

What it logs equals `python -m src.eval score` on the same answers: the real model's answers (which
equal `predict`'s on the converted release), and stubbed answers on a seeded subset (scored on a
release cut down to that subset). Two processes (DDP, FSDP2 over gloo) log one process's numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from src.eval.__main__ import main as eval_main
from src.eval.benchmarks import get_benchmark
from src.eval.predictions import PredictionWriter
from src.training.bench_callback import BenchmarkEval, fixed_subset, release_args
from src.training.module import LlavaLitModule
from tests.eval.test_benchmark_mme import write_release as write_mme
from tests.eval.test_benchmark_pope import write_release as write_pope
from tests.training.bench_fit import build, stub_answer, stub_replies

ROOT = Path(__file__).resolve().parents[2]


def logged_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    (events,) = Path(log_dir).glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def report_values(name: str, report: dict) -> dict[str, float]:
    """report.json's rows as the callback names them: bench/<name>/<row>/<column>."""
    out = {}
    for row, values in report["rows"].items():
        for column, value in values.items():
            if value is not None:
                out["/".join(p for p in ("bench", name, row, column) if p)] = value
    return out


def score(name: str, root: Path, predictions: Path, out: Path) -> dict[str, float]:
    eval_main(["score", name, "--root", str(root), "--predictions", str(predictions), "--out", str(out)])
    return report_values(name, json.loads((out / "report.json").read_text()))


def fit(tmp_path: Path, shards: dict, tokenizer: str, callback: BenchmarkEval, steps: int = 2) -> Trainer:
    seed_everything(0)
    module, data = build(tokenizer, shards["train"], lr=1e-3)
    trainer = Trainer(
        accelerator="cpu", max_steps=steps, limit_val_batches=0, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, logger=TensorBoardLogger(tmp_path / "logs"),
        callbacks=[callback],
    )  # fmt: skip
    trainer.fit(module, data)
    return trainer


def test_logged_scores_equal_the_scorer_on_predict_s_answers(tmp_path, demo_dir, shards) -> None:
    """Every question, the real tiny model: the callback's answers at the end of fit are predict's on the
    converted release, and the logged numbers are `src.eval score`'s on predict's file."""
    pope = write_pope(tmp_path / "pope", per_split=4)
    callback = BenchmarkEval([{"name": "pope", "root": str(pope)}], limit=None, batch_size=5)
    trainer = fit(tmp_path, shards, str(demo_dir / "tokenizer"), callback)
    logged = logged_scalars(trainer.logger.log_dir)
    assert sorted(callback.results) == [2]  # at the end of fit only
    bench = {tag: steps[2] for tag, steps in logged.items() if tag.startswith("bench/")}
    assert bench == pytest.approx(callback.results[2], abs=1e-4)  # TensorBoard keeps float32

    eval_main(["convert", "pope", "--root", str(pope), "--out", str(tmp_path / "conv"), "--json-only"])
    module = trainer.lightning_module
    data = trainer.datamodule
    data.hparams.update(predict_shards=None, predict_json=str(tmp_path / "conv/pope_all.json"),
                        predict_images=str(pope / "val2014"), eval_batch_size=3)  # fmt: skip
    writer = PredictionWriter(output=str(tmp_path / "predict.jsonl"))
    Trainer(accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False).predict(module, data)
    predicted = {r["id"]: r["answer"] for r in map(json.loads, open(tmp_path / "predict.jsonl"))}
    written = Path(trainer.logger.log_dir) / "bench/pope/step=2/predictions.jsonl"
    during = {r["id"]: r["answer"] for r in map(json.loads, open(written))}
    assert len(predicted) == 12 and during == predicted
    expected = score("pope", pope, tmp_path / "predict.jsonl", tmp_path / "report")
    failures = len(json.loads((tmp_path / "report/report.json").read_text())["failures"])
    assert callback.results[2] == {**expected, "bench/pope/failures": failures, "bench/pope/missing": 0.0}
    assert set(expected) >= {"bench/pope/all/accuracy", "bench/pope/random/truth_yes_ratio"}


def _cut_pope(source: Path, ids: set[str], out: Path) -> Path:
    """POPE's files keeping only the lines of `ids` (`<split>-<question_id>`)."""
    shutil.copytree(source / "val2014", out / "val2014")
    for path in source.glob("coco_pope_*.json"):
        split = path.stem.removeprefix("coco_pope_")
        lines = [line for line in path.read_text().splitlines() if f"{split}-{json.loads(line)['question_id']}" in ids]
        (out / path.name).write_text("".join(line + "\n" for line in lines))
    return out


def _text_of(image: Path) -> Path:
    """Where MME keeps an image's questions: beside it, or in questions_answers_YN/ beside images/."""
    return image.parent.parent / "questions_answers_YN" / image.name if image.parent.name == "images" else image


def _cut_mme(source: Path, images: set[str], out: Path) -> Path:
    """MME's folders keeping only the named images and their question files."""
    stems = {Path(source / image).relative_to(source).with_suffix("") for image in images}
    for path in source.rglob("*"):
        if path.is_file() and path.relative_to(source).with_suffix("") in stems | {_text_of(s) for s in stems}:
            target = out / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    return out


def test_a_seeded_subset_every_n_steps_equals_the_scorer_on_that_subset(tmp_path, demo_dir, shards, monkeypatch):
    """Stubbed answers (so the scores are not all zero) on 10 of POPE's 42 questions and whole MME
    pairs: at steps 1, 2 and 3 the logged numbers are `src.eval score`'s on releases cut down to the
    subset; the subset is the same each time and MME keeps both questions of each image."""
    pope, mme = write_pope(tmp_path / "pope"), write_mme(tmp_path / "mme")
    monkeypatch.setattr(LlavaLitModule, "reply", stub_replies({}))
    callback = BenchmarkEval(
        [{"name": "pope", "root": str(pope), "limit": 10}, {"name": "mme", "root": str(mme), "split": "test"}],
        limit=11, every_n_steps=1, seed=3,
    )  # fmt: skip
    trainer = fit(tmp_path, shards, str(demo_dir / "tokenizer"), callback, steps=3)
    assert sorted(callback.results) == [1, 2, 3]  # the end of fit's step was just evaluated: not again
    log_dir = Path(trainer.logger.log_dir)
    subsets = {name: json.loads((log_dir / f"bench/{name}/step=1/report.json").read_text())["questions"]
               for name in ("pope", "mme")}  # fmt: skip
    assert len(subsets["pope"]) == 10 and len(set(s.split("-")[0] for s in subsets["pope"])) > 1  # not the first rows
    assert len(subsets["mme"]) == 10  # 5 pairs: an 11th question would split a pair
    mme_questions = {q.id: q for q in get_benchmark("mme").load(release_args(type(get_benchmark("mme")), {"root": mme}))
                     .questions}  # fmt: skip
    pairs = [(mme_questions[i].group, mme_questions[i].info["pair"]) for i in subsets["mme"]]
    assert all(pairs.count(p) == 2 for p in pairs)
    cut_pope = _cut_pope(pope, set(subsets["pope"]), tmp_path / "cut_pope")
    cut_mme = _cut_mme(mme, {mme_questions[i].image for i in subsets["mme"]}, tmp_path / "cut_mme")
    answers = tmp_path / "answers.jsonl"
    for step in (1, 2, 3):
        assert json.loads((log_dir / f"bench/pope/step={step}/report.json").read_text())["questions"] == subsets["pope"]
        for name, root, ids in (("pope", cut_pope, subsets["pope"]), ("mme", cut_mme, subsets["mme"])):
            answers.write_text("".join(json.dumps({"id": i, "answer": stub_answer(i)}) + "\n" for i in ids))
            expected = score(name, root, answers, tmp_path / f"report-{name}-{step}")
            got = {k: v for k, v in callback.results[step].items() if k.startswith(f"bench/{name}/")}
            assert {k: v for k, v in got.items() if not k.endswith(("/failures", "/missing"))} == expected
            assert got[f"bench/{name}/missing"] == 0.0
    assert 0 < callback.results[3]["bench/pope/all/accuracy"] < 100
    logged = logged_scalars(log_dir)
    sections = [k for k in callback.results[1] if k in ("bench/mme/Perception/score", "bench/mme/Cognition/score")]
    assert sections
    for tag in sections:
        assert logged[tag] == pytest.approx({s: callback.results[s][tag] for s in (1, 2, 3)}, abs=1e-4)


def test_fixed_subset_keeps_units_whole_and_is_stable() -> None:
    mmbench = get_benchmark("mmbench")

    class Q:
        def __init__(self, index: int) -> None:
            self.id, self.info = str(index), {"index": index}

    questions = [Q(i + r * 1_000_000) for i in range(10) for r in range(3)]  # 10 questions x 3 rotations
    chosen = fixed_subset(mmbench, questions, 8, seed=0)
    assert len(chosen) == 6 and {len([c for c in chosen if int(c.id) % 1_000_000 == u]) for u in
                                 {int(c.id) % 1_000_000 for c in chosen}} == {3}  # fmt: skip
    assert [c.id for c in fixed_subset(mmbench, questions, 8, seed=0)] == [c.id for c in chosen]
    assert [c.id for c in fixed_subset(mmbench, questions, 8, seed=1)] != [c.id for c in chosen]
    assert fixed_subset(mmbench, questions, None, seed=0) == questions


def test_configuration_errors_are_plain(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown option.*'rooot'.*it takes"):
        BenchmarkEval([{"name": "pope", "rooot": "x"}])
    with pytest.raises(ValueError, match="required: --root"):
        BenchmarkEval([{"name": "pope"}])
    with pytest.raises(ValueError, match="unknown benchmark 'poppe'"):
        BenchmarkEval([{"name": "poppe", "root": "x"}])
    with pytest.raises(ValueError, match="scored by its own scorer"):
        BenchmarkEval([{"name": "scienceqa", "root": "x"}])
    with pytest.raises(ValueError, match="would never run"):
        BenchmarkEval([{"name": "pope", "root": "x"}], every_n_steps=None, at_fit_end=False)


# ---- two processes -----------------------------------------------------------------------------


def _dist_run(tmp_path: Path, releases: Path, strategy: str) -> tuple[dict, dict[str, str]]:
    out = tmp_path / strategy
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests/training/bench_fit.py"), "--strategy", strategy,
         "--releases", str(releases), "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    real: dict[str, str] = {}
    for path in tmp_path.glob(f"{strategy}-real-*.json"):
        part = json.loads(path.read_text())
        assert not set(part) & set(real)  # each question answered by one rank
        real.update(part)
    return json.loads(Path(f"{out}.json").read_text()), real


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> tuple[Path, dict, dict[str, str]]:
    tmp_path = tmp_path_factory.mktemp("bench_dist")
    releases = tmp_path / "releases"
    write_pope(releases / "pope")
    write_mme(releases / "mme")
    return (releases, *_dist_run(tmp_path, releases, "single"))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_log_one_process_s_numbers(tmp_path, single_process, strategy) -> None:
    """Each rank generates its share with the real model (lr 0: the weights stay those of one
    process); the scores of the stubbed answers and the real answers equal one process's."""
    releases, single, single_real = single_process
    results, real = _dist_run(tmp_path, releases, strategy)
    assert sorted(results) == ["1", "2"] and results == single
    assert real == single_real and len(real) == 20 + 30  # every question of both subsets
    assert 0 < single["2"]["bench/pope/all/accuracy"] < 100
