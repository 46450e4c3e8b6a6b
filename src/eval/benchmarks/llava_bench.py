"""LLaVA-Bench (Liu et al. 2023) in the registry: open questions on images, each reply rated by a
judge LLM against a reference answer; the score is model mean / reference mean x 100 per category
(conversation, detail description, complex reasoning) and overall.

A face of `src/eval/judge.py`, which does the work: `convert` is `judge.to_llava` (what `python -m
src.eval.judge prepare` writes), plus shards; `score` is `judge.evaluate` (what `python -m
src.eval.judge` writes: report.md, report.json, reviews.jsonl), on the release's files, with the
judge configured as there (`--judge` a ChatConfig YAML, `--rubrics`, `--max-attempts`).

Release, `--split wild` (default): llava-bench-in-the-wild's folder, `questions.jsonl`,
`context.jsonl`, `answers_gpt4.jsonl` (the references) and `images/`. `--split coco`: LLaVA's
COCO-val bench, `qa90_questions.jsonl`, `caps_boxes_coco2014_val_80.jsonl` (the context) and
`qa90_gpt4_answer.jsonl` in ROOT. `--questions`, `--context`, `--references` and `--images` name
other files.

Why not the generic path (`load` / `read` / `metric`): a reply is not read alone but reviewed by a
remote judge, many requests at once, and re-asked when its scores do not read. So the class leaves
`load` to the base, and `BenchmarkEval` refuses it when it is configured (at construction, before any
training): every rank would review every question, serially, at each evaluation. Score the
predictions of a checkpoint with `python -m src.eval score llava_bench` instead.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from src.eval.benchmarks.base import Benchmark, register_benchmark, write_converted

log = logging.getLogger(__name__)

# split -> (questions, context, references), in the release folder
SPLITS = {
    "wild": ("questions.jsonl", "context.jsonl", "answers_gpt4.jsonl"),
    "coco": ("qa90_questions.jsonl", "caps_boxes_coco2014_val_80.jsonl", "qa90_gpt4_answer.jsonl"),
}
NO_JUDGE = (
    "LLaVA-Bench is scored by a judge LLM: pass --judge JUDGE.yaml, the fields of the judge's ChatConfig "
    "(base_url of an OpenAI-compatible server, model, api_key_env ...; e.g. experiments/eval/judge.yaml)"
)


def release_file(args: argparse.Namespace, option: str, required: bool = True) -> Path | None:
    """The file `--<option>` names (as given), else the split's file in `--root`; None when an optional
    default file is absent (references for `convert`)."""
    given = getattr(args, option, None)
    if given is not None:
        path = Path(given)
    else:
        path = Path(args.root) / SPLITS[args.split][("questions", "context", "references").index(option)]
        if not required and not path.is_file():
            return None
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: --root must hold LLaVA-Bench's {', '.join(SPLITS[args.split])} "
            f"(split {args.split!r}), or --{option} must name the file"
        )
    return path


@register_benchmark
class LlavaBench(Benchmark):
    name = "llava_bench"
    title = "LLaVA-Bench"
    answer_kind = "judged"
    release = "folder with questions.jsonl, context.jsonl, answers_gpt4.jsonl, images/ (llava-bench-in-the-wild)"
    default_split = "wild"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, command: str) -> None:
        parser.add_argument("--root", type=Path, required=True, help=cls.release)
        parser.add_argument(
            "--split", default="wild", choices=list(SPLITS),
            help="wild (default): llava-bench-in-the-wild's files; coco: LLaVA's qa90_* COCO-val files",
        )  # fmt: skip
        parser.add_argument("--questions", type=Path, default=None, help="questions JSONL (default: the split's)")
        parser.add_argument(
            "--references", type=Path, default=None,
            help="reference answers JSONL (default: the split's; convert keeps them as each record's reference)",
        )  # fmt: skip
        if command == "convert":
            parser.add_argument("--images", type=Path, default=None, help="image folder (default ROOT/images)")
            return
        parser.add_argument("--context", type=Path, default=None, help="context JSONL (default: the split's)")
        parser.add_argument("--judge", type=Path, default=None, help="judge client YAML (ChatConfig fields): required")
        parser.add_argument(
            "--rubrics", type=Path, default=None, help="folder with system.txt, conv.txt, detail.txt, complex.txt"
        )
        parser.add_argument(
            "--max-attempts", type=int, default=3, help="asks per question while the scores are unreadable"
        )

    def convert(self, args: argparse.Namespace) -> str:
        """`judge.to_llava`'s records (ids = question ids, `<image>\\n` + the question, the reference as
        the gpt turn) as `llava_bench_<split>.json`, plus shards unless --json-only."""
        from src.eval.judge import to_llava

        questions = release_file(args, "questions")
        references = release_file(args, "references", required=args.references is not None)
        records = to_llava(questions, references)
        images = Path(args.images) if args.images is not None else Path(args.root) / "images"
        line = write_converted(self.name, args, records, images)
        return line + ("" if references else f"; no reference answers ({SPLITS[args.split][2]} not in --root)")

    def score(self, args: argparse.Namespace) -> str:
        """`judge.evaluate` on the release and the predictions: report.md, report.json, reviews.jsonl in
        `args.out`; returns the Markdown (report.md)."""
        if args.judge is None:
            raise ValueError(NO_JUDGE)
        from src.eval.judge import evaluate, markdown

        files = [release_file(args, option) for option in ("questions", "context", "references")]
        report = evaluate(*files, args.predictions, args.judge, args.out, args.rubrics, args.max_attempts, args.method)
        if report["unreadable"]:
            log.warning("%d reviews could not be read; they are listed in %s", len(report["unreadable"]), args.out)
        return markdown(report)
