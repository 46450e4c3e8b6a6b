"""ScienceQA in the registry: the existing converter and scorer (src/eval/scienceqa*.py), unchanged."""

from __future__ import annotations

import argparse
from pathlib import Path

from src.eval.benchmarks.base import Benchmark, register_benchmark
from src.eval.scienceqa_data import FORMATS


@register_benchmark
class ScienceQA(Benchmark):
    name = "scienceqa"
    title = "ScienceQA"
    answer_kind = "letter"
    release = "folder with problems.json, pid_splits.json, images/ (lupantech/ScienceQA)"
    default_split = "test"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, command: str) -> None:
        super().add_arguments(parser, command)
        if command == "convert":
            parser.add_argument("--format", default="CQM-A", choices=FORMATS, help="prompt format (the paper's names)")
        else:
            parser.add_argument("--judge", type=Path, default=None, help="judge client YAML (the GPT-4-judge row)")
            parser.add_argument("--lenient", action="store_true", help="add a row read by the lenient mode")

    def convert(self, args: argparse.Namespace) -> str:
        from src.eval.scienceqa_data import convert

        summary = convert(args.root, args.split, args.format, args.out, args.prefix, args.max_count)
        return f"{summary['samples']} samples in {summary['shards']} shards {args.out}/{summary['prefix']}-*.tar; LLaVA JSON {summary['json']}"

    def score(self, args: argparse.Namespace) -> str:
        from src.eval.scienceqa import score

        return score(args.root, args.split, args.predictions, args.out, args.method, args.judge, args.lenient)
