"""Benchmarks during training: `BenchmarkEval` runs chosen benchmarks of the registry
(`src.eval.benchmarks`) on a fixed subset every N optimizer steps and / or at the end of fit,
and logs `bench/<name>/<row>/<column>`, the numbers `python -m src.eval score` writes in its
report, to the trainer's loggers (TensorBoard).

    trainer:
      callbacks:
        - class_path: src.training.bench_callback.BenchmarkEval
          init_args:
            benchmarks:
              - {name: pope, root: data/pope/coco, images: data/coco/val2014, split: adversarial}
              - {name: textvqa, root: data/textvqa, limit: 100}
            limit: 200            # questions per benchmark (a seeded subset, the same at every step)
            every_n_steps: 500    # null: only at the end of fit
            at_fit_end: true

The questions are asked as `predict` asks them: the benchmark's records go through the
datamodule's `predict_dataloader` (its template, image transform and image policy), each rank
answering its share, in lockstep under FSDP2 (`LockstepBatches`, and generation ends when every
rank is done). Every rank then holds all the answers (one all-gather of short strings) and feeds
its slice of the questions to the benchmark's metric, whose states are concatenated across
ranks: the numbers equal one process's. Rank 0 also writes the answers and the report under
`<log_dir>/bench/<name>/step=<N>/` (predictions.jsonl, report.json), so any logged number can be
rescored with `python -m src.eval score`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from src.eval.benchmarks import BENCHMARKS, Benchmark, Question, Release
from src.eval.benchmarks.base import markdown_table


class _Refusal(argparse.ArgumentParser):
    """The benchmark's own release options, read from a dict: a wrong one raises, never exits."""

    def error(self, message: str):  # type: ignore[override]
        raise ValueError(message)


def release_args(benchmark: type[Benchmark], options: Mapping[str, Any]) -> argparse.Namespace:
    """The options of a YAML entry (`root`, `split`, `images` ...) as `score`'s parser reads them,
    so a release is loaded exactly as `python -m src.eval score <name> --root ...` loads it."""
    parser = _Refusal(prog=f"benchmark {benchmark.name}", add_help=False)
    benchmark.add_arguments(parser, "score")
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    unknown = sorted(set(options) - set(actions))
    if unknown:
        raise ValueError(f"benchmark {benchmark.name!r}: unknown option(s) {unknown}; it takes {sorted(actions)}")
    argv: list[str] = []
    for key, value in options.items():
        action = actions[key]
        if action.nargs == 0:  # a flag
            argv += [action.option_strings[0]] if value else []
        elif value is not None:
            argv += [action.option_strings[0], str(value)]
    try:
        return parser.parse_args(argv)
    except ValueError as error:
        raise ValueError(f"benchmark {benchmark.name!r}: {error}") from None


def fixed_subset(benchmark: Benchmark, questions: list[Question], limit: int | None, seed: int) -> list[Question]:
    """At most `limit` questions, drawn by `seed` as whole units (MME's pairs, MMBench's rotations,
    else single questions), in the release's order: the same subset at every step and on every rank,
    spread over the release's splits and categories rather than its first rows."""
    if limit is None or limit >= len(questions):
        return list(questions)
    units: dict[str, list[int]] = {}
    for position, question in enumerate(questions):
        units.setdefault(benchmark.unit(question), []).append(position)
    order = list(units)
    random.Random(seed).shuffle(order)
    chosen: list[int] = []
    for key in order:
        if len(chosen) + len(units[key]) <= limit:
            chosen += units[key]
        if len(chosen) == limit:
            break
    return [questions[position] for position in sorted(chosen)]


@dataclasses.dataclass
class _Prepared:
    """One benchmark ready to ask: its subset, the records file `predict` reads, the image folder."""

    name: str
    benchmark: Benchmark
    questions: list[Question]
    records: Path
    images: Path
    skipped: dict[str, int]


class BenchmarkEval(Callback):
    """Scores benchmarks of the registry while training; see the module's docstring."""

    def __init__(
        self,
        benchmarks: list[dict[str, Any]],
        limit: int | None = 200,
        every_n_steps: int | None = None,
        at_fit_end: bool = True,
        seed: int = 0,
        batch_size: int | None = None,
        max_new_tokens: int | None = None,
        write_files: bool = True,
    ) -> None:
        """
        Args:
            benchmarks: one entry per benchmark: `name` (a registered benchmark), an optional `limit`
                for it alone, and its release options as `python -m src.eval score NAME --help` lists
                them (`root`, `split`, `images` ...).
            limit: questions per benchmark, a subset drawn once with `seed` (whole MME pairs and
                MMBench rotations); null: every question.
            every_n_steps: optimizer steps between evaluations; null: none during training.
            at_fit_end: evaluate once more when fit ends (unless that step was just evaluated).
            seed: draws the subset.
            batch_size: prompts per batch (default: data.eval_batch_size, else data.batch_size).
            max_new_tokens: longest reply (default: model.generation's, else model.max_new_tokens).
                Replies are greedy whatever model.generation says: a sampled score moves with the seed.
            write_files: rank 0 writes predictions.jsonl, report.json and report.md per evaluation
                under `<log_dir>/bench/<name>/step=<N>/`.
        """
        super().__init__()
        if not benchmarks:
            raise ValueError("BenchmarkEval needs at least one benchmark: [{name: pope, root: ...}, ...]")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1 (or null), got {every_n_steps}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1 (or null), got {limit}")
        if every_n_steps is None and not at_fit_end:
            raise ValueError("BenchmarkEval with every_n_steps null and at_fit_end false would never run")
        self.entries = []
        for entry in benchmarks:
            entry = dict(entry)
            name = entry.pop("name", None)
            if name is None:
                raise ValueError(f"a benchmark entry needs a `name`, got {entry}")
            cls = BENCHMARKS.get(name)  # an unknown name lists the registered ones
            if cls.load is Benchmark.load:
                raise ValueError(f"benchmark {name!r} is scored by its own scorer only (python -m src.eval score)")
            own_limit = entry.pop("limit", limit)
            self.entries.append((name, cls, own_limit, release_args(cls, entry)))
        self.every_n_steps, self.at_fit_end, self.seed = every_n_steps, at_fit_end, seed
        self.batch_size, self.max_new_tokens, self.write_files = batch_size, max_new_tokens, write_files
        self.prepared: list[_Prepared] = []
        self.last_step: int | None = None
        self.results: dict[int, dict[str, float]] = {}  # step -> what was logged (every rank)
        self._folder: tempfile.TemporaryDirectory | None = None

    # ---- preparing ----------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.prepared:
            return
        if not hasattr(trainer.datamodule, "predict_dataloader") or not hasattr(pl_module, "reply"):
            raise ValueError("BenchmarkEval needs the kit's LlavaDataModule and LlavaLitModule")
        self._folder = tempfile.TemporaryDirectory(prefix="bench-")  # per rank: nodes share no disk
        for name, cls, limit, args in self.entries:
            benchmark = cls()
            folder = Path(self._folder.name) / name
            args = argparse.Namespace(**vars(args), out=folder)  # where MMBench puts the images it embeds
            release: Release = benchmark.load(args)
            questions = fixed_subset(benchmark, release.questions, limit, self.seed)
            if not questions:
                raise ValueError(f"benchmark {name!r}: the release has no questions")
            subset = Release(questions, release.image_root, release.skipped)
            folder.mkdir(parents=True, exist_ok=True)
            benchmark.write_images(subset, folder)
            records = folder / "records.json"
            records.write_text(json.dumps(benchmark.records(subset), ensure_ascii=False))
            self.prepared.append(_Prepared(name, benchmark, questions, records, release.image_root, release.skipped))
            rank_zero_info(
                f"BenchmarkEval: {name}, {len(questions)} of {len(release.questions)} questions"
                + (f" (the converter skipped {release.skipped})" if release.skipped else "")
            )

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None
            self.prepared = []

    # ---- when -----------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step and step % self.every_n_steps == 0 and step != self.last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_fit_end and trainer.global_step != self.last_step:
            self.evaluate(trainer, pl_module)

    # ---- asking and scoring ----------------------------------------------------------------
    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Every benchmark at this step: answers, scores, logs; returns what was logged."""
        step = self.last_step = trainer.global_step
        logged: dict[str, float] = {}
        was_training = pl_module.training
        pl_module.eval()
        try:
            for prepared in self.prepared:
                answers, skipped = self._answers(trainer, pl_module, prepared)
                logged.update(self._score(trainer, prepared, answers, skipped, step))
        finally:
            pl_module.train(was_training)
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=step)
        self.results[step] = logged
        return logged

    @contextlib.contextmanager
    def _asking(self, trainer: Trainer, pl_module: LightningModule, prepared: _Prepared) -> Iterator[Any]:
        """The datamodule's predict loader over the benchmark's records, greedy replies; both restored after."""
        data = trainer.datamodule.hparams
        keys = ("predict_shards", "predict_json", "predict_images", "eval_batch_size")
        saved_data = {key: data.get(key) for key in keys}
        saved_generation = pl_module.generation_config
        data.update(predict_shards=None, predict_json=str(prepared.records), predict_images=str(prepared.images))
        if self.batch_size is not None:
            data["eval_batch_size"] = self.batch_size
        pl_module.generation_config = dataclasses.replace(
            saved_generation,
            temperature=0.0,
            max_new_tokens=self.max_new_tokens if self.max_new_tokens is not None else saved_generation.max_new_tokens,
        )
        try:
            yield trainer.datamodule.predict_dataloader()
        finally:
            data.update(saved_data)
            pl_module.generation_config = saved_generation

    def _answers(
        self, trainer: Trainer, pl_module: LightningModule, prepared: _Prepared
    ) -> tuple[dict[str, dict], dict[str, int]]:
        """All ranks' replies by id (every rank gets all of them) and the samples the loader skipped."""
        mine: dict[str, str] = {}
        skipped: dict[str, int] = {}
        with self._asking(trainer, pl_module, prepared) as loader, torch.no_grad():
            for batch in loader:
                for reason, n in (batch.pop("skipped", None) or {}).items():
                    skipped[reason] = skipped.get(reason, 0) + n
                if batch.get("empty"):
                    continue
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                replies = pl_module.reply(batch)  # a filler too: under FSDP2 every rank runs every batch
                if not batch.get("filler"):
                    mine.update((reply["id"], reply["answer"]) for reply in replies)
        parts = [(mine, skipped)]
        if trainer.world_size > 1:
            parts = [None] * trainer.world_size
            dist.all_gather_object(parts, (mine, skipped))
        answers: dict[str, dict] = {}
        total: dict[str, int] = {}
        for replies, counts in parts:
            answers.update((key, {"text": text, "model": None}) for key, text in replies.items())
            for reason, n in counts.items():
                total[reason] = total.get(reason, 0) + n
        return answers, total

    def _score(
        self, trainer: Trainer, prepared: _Prepared, answers: dict[str, dict], skipped: dict[str, int], step: int
    ) -> dict[str, float]:
        """The benchmark's metric over the subset, this rank feeding its slice (states concatenated
        across ranks); the report's numbers as `bench/<name>/<row>/<column>`."""
        benchmark, questions = prepared.benchmark, prepared.questions
        rank, world = trainer.global_rank, trainer.world_size
        readings = [benchmark.read(answers[q.id]["text"] if q.id in answers else None, q) for q in questions]
        metric = benchmark.metric(questions).to(trainer.strategy.root_device)  # groups from the whole subset
        share = list(range(rank, len(questions), world))
        if share:
            benchmark.update(metric, [questions[i] for i in share], [readings[i] for i in share])
        computed = metric.compute()
        columns, rows = benchmark.rows(computed)
        missing = [q.id for q in questions if q.id not in answers]
        failures = [
            {"id": q.id, "answer": answers[q.id]["text"]}
            for q, reading in zip(questions, readings, strict=True)
            if q.id in answers and benchmark.failed(reading)
        ]
        logged: dict[str, float] = {}
        for row, values in rows:
            for column in columns:
                if values.get(column) is not None:
                    logged["/".join(part for part in ("bench", prepared.name, row, column) if part)] = values[column]
        logged[f"bench/{prepared.name}/failures"] = float(len(failures))
        logged[f"bench/{prepared.name}/missing"] = float(len(missing))
        if missing:
            rank_zero_warn(
                f"BenchmarkEval {prepared.name} step {step}: {len(missing)} questions without an answer (scored "
                f"wrong), e.g. {missing[:3]}; the loader skipped {skipped}"
            )
        if self.write_files:
            folder = Path(trainer.log_dir or trainer.default_root_dir)  # log_dir is a broadcast: every rank asks
            if trainer.is_global_zero:
                self._write(folder, prepared, answers, columns, rows, failures, missing, step)
        return logged

    def _write(self, folder: Path, prepared: _Prepared, answers: dict, columns: list[str], rows: list,
               failures: list, missing: list[str], step: int) -> None:  # fmt: skip
        root = folder / "bench" / prepared.name / f"step={step}"
        root.mkdir(parents=True, exist_ok=True)
        with open(root / "predictions.jsonl", "w", encoding="utf-8") as stream:
            for question in prepared.questions:
                if question.id in answers:
                    line = {"id": question.id, "answer": answers[question.id]["text"], "model": f"step={step}"}
                    stream.write(json.dumps(line, ensure_ascii=False) + "\n")
        notes = [f"{len(prepared.questions)} questions (seed {self.seed} subset) at step {step}",
                 f"failures (reply not read, counted wrong): {len(failures)}",
                 f"missing predictions (counted wrong): {len(missing)}"]  # fmt: skip
        (root / "report.md").write_text(markdown_table(f"step={step}", columns, rows, notes))
        report = {"benchmark": prepared.name, "step": step, "questions": [q.id for q in prepared.questions],
                  "columns": columns, "rows": dict(rows), "failures": failures, "missing": missing}  # fmt: skip
        (root / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")


__all__ = ["BenchmarkEval", "fixed_subset", "release_args"]
