"""The generation loop: every (image, kind) not yet in the ledger is asked of the teacher,
parsed, validated, retried on rejection, and recorded in the ledger the moment it is done.

Jobs flow from the input through a bounded queue to workers, so a million-image input is
never held in memory and at most a few jobs wait beyond the client's own concurrency limit.
A job ends in the ledger as `ok` (a valid conversation), `rejected` (every one of
`max_attempts` replies failed validation; replies cut off by the token limit are asked again
with a larger one first, see `run_job`) or `error` (the client gave up: retries exhausted,
or a 400 for this prompt). An authentication or not-found answer (401, 403, 404) stops the run
at once with the server's reason: it would fail every job the same way.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass

from src.core.chat_client import ChatClient, ChatError
from src.instruct.config import GenerateConfig
from src.instruct.ledger import OK, Ledger
from src.instruct.parse import Rejected, to_conversation, validate
from src.instruct.prompts import KindSpec, build_messages, shown_numbers
from src.instruct.sampling import image_first, pick_question
from src.instruct.sources import Item, Source

log = logging.getLogger(__name__)

FATAL_STATUSES = frozenset({401, 403, 404})
LOG_FIRST = 3  # rejections of each reason logged as warnings; later ones at debug level


class FatalError(RuntimeError):
    """The teacher refuses every request the same way (bad key, unknown model or URL)."""


@dataclass
class RunStats:
    jobs: int = 0  # submitted this run
    skipped_done: int = 0  # already ok in the ledger
    ok: int = 0
    rejected: int = 0
    error: int = 0
    elapsed_s: float = 0.0


def grown_limit(current: int | None, config: GenerateConfig) -> int | None:
    """The token limit to ask again with after a reply was cut off at `current`; None when it
    cannot grow (already at max_tokens_cap, or the limit is unknown)."""
    if not current or current >= config.max_tokens_cap:
        return None
    return min(config.max_tokens_cap, max(current + 1, int(current * config.length_growth)))


async def run_job(
    client: ChatClient,
    spec: KindSpec,
    item: Item,
    config: GenerateConfig,
    ledger: Ledger,
    rejections: Counter,
    questions: tuple[str, ...] = (),
) -> str:
    """Ask, parse, validate, retry on rejection; write the job's ledger entry; its status.

    A reply cut off by the token limit is never kept: it is asked again with a limit
    `length_growth` times larger (at the same temperature: the reply was not wrong, only
    short of room), and those retries do not use up `max_attempts` until the limit reaches
    `max_tokens_cap`; a reply cut off there is a rejected attempt like any other. Without a
    `max_tokens` setting the server's own limit cut the reply: the reply's completion tokens
    are that limit, and the larger one is grown from them."""
    messages = build_messages(spec, item, config.decimals)
    shown = shown_numbers(spec, item, config.decimals)
    question = pick_question(questions, config.seed, item.id, spec.kind) if spec.single_answer else None
    first = image_first(config.image_position, config.seed, item.id, spec.kind)
    own: Counter[str] = Counter()
    tokens = Counter()
    entry = {"id": item.id, "kind": spec.kind, "image": item.image}
    max_tokens = config.teacher.max_tokens
    attempts = replies = 0
    hot = False  # a rejected reply was seen: ask for variety
    while attempts < config.max_attempts:
        overrides = {}
        if hot:  # a greedy teacher would repeat the reply just rejected
            overrides["temperature"] = max(config.teacher.temperature, config.retry_temperature)
        if max_tokens != config.teacher.max_tokens:
            overrides["max_tokens"] = max_tokens
        try:
            reply = await client.chat(messages, **overrides)
        except ChatError as error:
            if error.status in FATAL_STATUSES:
                raise FatalError(str(error)) from None
            log.warning("item %s (%s): %s", item.id, spec.kind, error)
            ledger.write(entry | {"status": "error", "error": str(error), "rejections": dict(own), **tokens})
            return "error"
        replies += 1
        tokens["prompt_tokens"] += reply.prompt_tokens
        tokens["completion_tokens"] += reply.completion_tokens
        try:
            if reply.finish_reason == "length":
                limit = max_tokens if max_tokens is not None else "the server's own"
                raise Rejected("truncated", f"cut off at the token limit ({limit})")
            conversation = to_conversation(spec, reply.text, question, first)
            validate(conversation, spec, shown, config.image_position)
        except Rejected as rejected:
            own[rejected.reason] += 1
            rejections[rejected.reason] += 1
            # the first few of each reason are shown: a teacher that ignores the format shows at once
            level = logging.WARNING if rejections[rejected.reason] <= LOG_FIRST else logging.DEBUG
            log.log(
                level, "item %s (%s): reply rejected, %s; it began %r", item.id, spec.kind, rejected, reply.text[:160]
            )
            # with no max_tokens set, the server's own limit is what the cut-off reply used
            cut_at = max_tokens if max_tokens is not None else reply.completion_tokens
            if rejected.reason == "truncated" and (grown := grown_limit(cut_at, config)) is not None:
                max_tokens = grown  # not an attempt used up: the reply had no room to finish
                continue
            attempts += 1
            hot = True
            continue
        ledger.write(
            entry
            | {"status": OK, "conversations": conversation, "attempts": replies, "rejections": dict(own), **tokens}
            | ({"max_tokens": max_tokens} if max_tokens != config.teacher.max_tokens else {})
        )
        return OK
    ledger.write(entry | {"status": "rejected", "attempts": replies, "rejections": dict(own), **tokens})
    return "rejected"


async def generate(
    config: GenerateConfig,
    source: Source,
    specs: dict[str, KindSpec],
    ledger: Ledger,
    client: ChatClient,
    questions: tuple[str, ...] = (),
) -> RunStats:
    """Run every pending job of `source` x `config.kinds`; the ledger holds the results.
    `questions`: the detail kind's question list."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    stats = RunStats()
    rejections: Counter[str] = Counter()
    workers = config.teacher.max_concurrency * 2
    queue: asyncio.Queue = asyncio.Queue(maxsize=workers * 2)
    total = config.total_jobs(source.total)
    start = time.monotonic()
    initial = sum(1 for _, kind in ledger.ok() if kind in config.kinds)
    initial = min(initial, total) if total is not None else initial

    async def produce() -> None:
        for index, item in enumerate(source):
            if config.limit is not None and index >= config.limit:
                break
            for kind in config.kinds_for(index):
                if ledger.done(item.id, kind):
                    stats.skipped_done += 1  # counted in the bar's initial value
                    continue
                stats.jobs += 1
                await queue.put((item, specs[kind]))
        for _ in range(workers):
            await queue.put(None)

    async def work() -> None:
        while (job := await queue.get()) is not None:
            item, spec = job
            status = await run_job(client, spec, item, config, ledger, rejections, questions)
            setattr(stats, status, getattr(stats, status) + 1)
            bar.update()
            bar.set_postfix(
                ok=stats.ok,
                failed=stats.rejected + stats.error,
                rejected_replies=sum(rejections.values()),
                retries=client.usage["retries"],
                refresh=False,
            )

    with ExitStack() as stack:
        if config.progress:
            stack.enter_context(logging_redirect_tqdm())
        bar = stack.enter_context(
            tqdm(
                total=total,
                initial=initial,
                unit=" samples",
                file=sys.stderr,
                disable=not config.progress,
                dynamic_ncols=True,
                mininterval=0.5,  # a log file gets a line every half second at most, not one per sample
            )
        )
        tasks = [asyncio.ensure_future(produce())] + [asyncio.ensure_future(work()) for _ in range(workers)]
        try:
            # the first failure (a FatalError) ends the run; the others are cancelled
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    stats.elapsed_s = round(time.monotonic() - start, 3)
    return stats
