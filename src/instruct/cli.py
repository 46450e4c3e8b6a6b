"""Instruction data from captions and boxes, written by any OpenAI-compatible teacher.

    python -m src.instruct --config experiments/instruct/local_vllm.yaml
    OPENAI_API_KEY=... python -m src.instruct --coco-captions captions_train2017.json \\
        --coco-instances instances_train2017.json --images coco/train2017 --out runs/instruct/coco \\
        --base-url https://api.openai.com/v1 --model gpt-4o-mini --limit 100

Every setting is a YAML key (`--config`) and a typed flag (`--help` lists them with their docs,
`--print_config` prints what a command resolves to); flags win. Outputs in --out: ledger.jsonl
(finished work: rerunning the same command resumes), {prefix}.json (LLaVA records),
shards/{prefix}-NNNNNN.tar (+ sizes.json), summary.json and config.yaml (the settings, with the
key's environment variable name but never the key). See docs/instruct.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path

from src.core.chat_client import ChatClient, ChatError
from src.core.cli_config import fail
from src.instruct.config import GenerateConfig, parse_args, save_config
from src.instruct.generate import FatalError, generate
from src.instruct.ledger import Ledger
from src.instruct.output import format_summary, summarize, write_outputs
from src.instruct.prompts import KindSpec, build_messages, load_kind, load_questions
from src.instruct.sampling import pick_question
from src.instruct.sources import CocoSource, RecordSource, ShardSource, Source

log = logging.getLogger("src.instruct")


def make_source(config: GenerateConfig) -> Source:
    if config.coco_captions:
        return CocoSource(config.coco_captions, config.coco_instances, config.images)
    if config.records:
        return RecordSource(config.records, config.images, config.boxes_normalized)
    return ShardSource(config.shards, config.boxes_normalized)


def load_prompts(config: GenerateConfig) -> tuple[dict[str, KindSpec], tuple[str, ...]]:
    """Each configured kind's prompts, and the detail questions (read only when detail is asked
    for): every prompt file is read, and its errors raised, before anything is sent."""
    specs = {kind: load_kind(kind, config.prompts) for kind in config.kinds}
    questions = load_questions(config.detail_questions) if any(s.single_answer for s in specs.values()) else ()
    return specs, questions


def run(config: GenerateConfig) -> dict:
    """Generate what the ledger lacks, then write the outputs and the summary; returns the summary.

    Raises ValueError for bad settings or input files and FatalError when the teacher refuses
    every request (bad key, unknown model); the ledger keeps what was finished either way."""
    config.check()
    specs, questions = load_prompts(config)
    source = make_source(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    with Ledger(out / "ledger.jsonl") as ledger:

        async def main():
            async with ChatClient(config.teacher) as client:
                return await generate(config, source, specs, ledger, client, questions), client.usage

        stats, usage = asyncio.run(main())
        skips = dict(sorted(source.skips.total.items()))
        boxes_dropped = dict(sorted(source.boxes_dropped.items()))
        outputs = write_outputs(config, source, ledger)
        summary = summarize(config, ledger, stats, usage, outputs, skips, boxes_dropped)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def preview(config: GenerateConfig, items: int = 1) -> str:
    """The requests the first `items` images would send, one per kind, as text: for checking
    prompts and box rendering before paying for a run. Sends nothing, writes nothing."""
    config.check()
    specs, questions = load_prompts(config)
    blocks = []
    for index, item in enumerate(make_source(config)):
        if index >= items:
            break
        for kind in config.kinds_for(index):
            messages = build_messages(specs[kind], item, config.decimals)
            blocks.append(
                f"######## image {item.id} ({item.image}), {kind}: {len(messages)} messages from {specs[kind].origin}"
            )
            if specs[kind].single_answer:
                question = pick_question(questions, config.seed, item.id, kind)
                blocks.append(f"(the sample's question: {question})")
            blocks.extend(f"--- {m['role']}\n{m['content']}" for m in messages)
    return "\n".join(blocks) if blocks else "no usable image in the input"


def main(argv: list[str] | None = None) -> None:
    try:
        config, switches = parse_args(sys.argv[1:] if argv is None else argv, __doc__)
    except ValueError as error:
        fail(str(error))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    if switches["verbose"]:  # ours only: the HTTP libraries' debug logs are of no use here
        logging.getLogger("src").setLevel(logging.DEBUG)
    try:
        if switches["dry_run"]:
            print(preview(config))
            return
        summary = run(config)
    except (ValueError, FileNotFoundError, ChatError) as error:
        fail(str(error))
    except FatalError as error:
        fail(f"the teacher refused the request, stopping: {error}", code=3)
    except KeyboardInterrupt:
        print("interrupted; finished samples are in the ledger, rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None
    print(format_summary(summary), file=sys.stdout)
    print(f"summary: {Path(config.out) / 'summary.json'}")
