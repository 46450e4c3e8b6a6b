"""`python -m src.data.shards`: the writer and the inspector on the command line.

    python -m src.data.shards write --json llava_v1_5_mix665k.json --images playground/data \\
        --out /data/llava665k --prefix train
    python -m src.data.shards inspect '/data/llava665k/train-{000000..000066}.tar' \\
        --tokenizer lmsys/vicuna-7b-v1.5 --image-tokens 576

`write` turns LLaVA JSON/JSONL + an image folder into shards (`src.data.shards.writer`: what is kept,
skipped and re-encoded, and why); `inspect` reports on any shard set before training on it
(`src.data.shards.inspector`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from src.data.decode import MAX_PIXELS
from src.data.inputs import read_records
from src.data.records import read_sizes_table
from src.data.shards.inspector import format_report, inspect_shards
from src.data.shards.writer import format_summary, write_shards


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m src.data.shards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="LLaVA JSON/JSONL + image folder -> WebDataset shards")
    write.add_argument("--json", type=Path, required=True, help="LLaVA records: a JSON list or JSONL")
    write.add_argument("--images", type=Path, required=True, help="folder the records' image paths are relative to")
    write.add_argument("--out", type=Path, required=True, help="folder for the shards, sizes.json and the summary")
    write.add_argument("--prefix", default="train", help="shard names: {prefix}-000000.tar ...")
    write.add_argument("--max-count", type=int, default=10000, help="samples per shard at most")
    write.add_argument("--max-size", type=float, default=3e9, help="bytes per shard at most (3e9 accepted)")
    write.add_argument("--limit", type=int, default=None, help="read only the first N records")
    write.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="images over this many pixels are skipped")
    inspect = commands.add_parser("inspect", help="counts, member types and token lengths of a shard set")
    inspect.add_argument("shards", nargs="+", help="shard paths, brace patterns or URLs")
    inspect.add_argument("--tokenizer", default=None, help="tokenizer folder or hub name: adds token-length stats")
    inspect.add_argument("--template", default="vicuna_v1", help="conversation template")
    inspect.add_argument("--image-tokens", type=int, default=576, help="tokens one image becomes")
    inspect.add_argument("--view", default="conversations", help="conversations, caption or mc")
    inspect.add_argument("--max-length", type=int, default=2048, help="count examples longer than this")
    inspect.add_argument("--samples", type=int, default=None, help="read only the first N samples")
    inspect.add_argument("--show", type=int, default=1, help="samples to render with their supervised spans")
    args = parser.parse_args(argv)

    if args.command == "write":
        if args.max_count < 1 or args.max_size < 1 or args.max_pixels < 1:
            parser.error("--max-count, --max-size and --max-pixels must be positive")
        if not args.json.is_file():
            parser.error(f"--json {args.json} is not a file")
        if not args.images.is_dir():
            parser.error(f"--images {args.images} is not a folder")
        try:
            records, total = read_records(args.json)
        except ValueError as error:  # a JSON list that does not parse cannot be skipped around
            parser.error(f"cannot read {args.json}: {error}")
        if (args.out / "sizes.json").is_file():
            try:
                read_sizes_table(args.out / "sizes.json")  # its other sets' entries are kept: it must read
            except ValueError as error:
                parser.error(str(error))
        summary = write_shards(
            records, args.images, args.out, prefix=args.prefix, max_count=args.max_count,
            max_size=int(args.max_size), limit=args.limit, total=total, progress=True, source=str(args.json),
            max_pixels=args.max_pixels,
        )  # fmt: skip
        print(format_summary(summary, args.out, args.prefix))
        return
    from src.data.samples import VIEWS  # imported here: `write` needs no torch

    if args.view not in VIEWS:
        parser.error(f"unknown view {args.view!r}; choose one of {list(VIEWS)}")
    tokenizer = None
    if args.tokenizer is not None:
        from transformers import AutoTokenizer

        from src.data.tokenizer import prepare_tokenizer

        # as training prepares it: a hub tokenizer (Vicuna's) gains `<image>` and a pad token
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(args.tokenizer))
    report = inspect_shards(
        args.shards, tokenizer, template=args.template, image_tokens=args.image_tokens, view=args.view,
        max_length=args.max_length, samples=args.samples, show=args.show,
    )  # fmt: skip
    print(format_report(report, args.view, args.template, args.image_tokens, args.max_length))
