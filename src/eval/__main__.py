"""`python -m src.eval`: convert a benchmark's official release, or score predictions on it.

    python -m src.eval convert pope --root data/pope/coco --images data/coco/val2014 --out shards/pope
    python -m src.cli predict --config ... --ckpt_path ... --data.predict_json shards/pope/pope_all.json \\
        --data.predict_images data/coco/val2014
    python -m src.eval score pope --root data/pope/coco --predictions preds.jsonl --out reports/pope

`python -m src.eval convert BENCH --help` shows a benchmark's release options.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from src.core.chat_client import ChatError
from src.eval.benchmarks import BENCHMARKS


def build_parser() -> argparse.ArgumentParser:
    listing = "\n".join(
        f"  {name:<11} {BENCHMARKS.get(name).title} ({BENCHMARKS.get(name).answer_kind} answers): "
        f"{BENCHMARKS.get(name).release}"
        for name in BENCHMARKS.names()
    )
    parser = argparse.ArgumentParser(
        prog="python -m src.eval",
        description=__doc__ + "\nbenchmarks:\n" + listing,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for command, text in (("convert", "official release -> LLaVA JSON + shards"), ("score", "predictions -> report")):
        sub = commands.add_parser(command, help=text)
        benches = sub.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
        for name in BENCHMARKS.names():
            cls = BENCHMARKS.get(name)
            bench = benches.add_parser(name, help=f"{cls.title}: {cls.release}")
            cls.add_arguments(bench, command)
            if command == "convert":
                bench.add_argument("--out", type=Path, required=True, help="folder for the JSON and shards")
                bench.add_argument("--prefix", default=None, help="shard name prefix (default <name>_<split>)")
                bench.add_argument("--max-count", type=int, default=10000, help="samples per shard at most")
                bench.add_argument("--json-only", action="store_true", help="write the LLaVA JSON only, no shards")
            else:
                bench.add_argument(
                    "--predictions", type=Path, required=True, help="JSONL: (id, answer) or (question_id, text)"
                )
                bench.add_argument(
                    "--out", type=Path, required=True, help="folder for report.md, report.json and per-question lines"
                )
                bench.add_argument("--method", default=None, help="row name (default: the predictions' model)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    benchmark = BENCHMARKS.get(args.benchmark)()
    try:
        if args.command == "convert":
            print(benchmark.convert(args))
        else:
            print(benchmark.score(args), end="")
    except (FileNotFoundError, ValueError, KeyError, ChatError) as error:  # ChatError: a judge gave up
        parser.error(f"{args.benchmark}: {error}")


if __name__ == "__main__":
    main()
