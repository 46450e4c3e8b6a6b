"""The generation loop: every (image, kind) not yet in the ledger is asked of the teacher,
parsed, validated, retried on rejection, and recorded in the ledger the moment it is done.

Jobs flow from the input through a bounded queue to workers, so a million-image input is
never held in memory and at most a few jobs wait beyond the client's own concurrency limit.
A job ends in the ledger as `ok` (a valid conversation), `rejected` (every one of
`max_attempts` replies failed validation) or `error` (the client gave up: retries exhausted,
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

from src.instruct.client import ChatClient, ChatError
from src.instruct.config import GenerateConfig
from src.instruct.ledger import OK, Ledger
from src.instruct.parse import Rejected, to_conversation, validate
from src.instruct.prompts import KindSpec, build_messages
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


async def run_job(
    client: ChatClient, spec: KindSpec, item: Item, config: GenerateConfig, ledger: Ledger, rejections: Counter
) -> str:
    """Ask, parse, validate, retry on rejection; write the job's ledger entry; its status."""
    messages = build_messages(spec, item, config.decimals)
    own: Counter[str] = Counter()
    tokens = Counter()
    entry = {"id": item.id, "kind": spec.kind, "image": item.image}
    for attempt in range(config.max_attempts):
        overrides = {}
        if attempt:  # a greedy teacher would repeat the reply just rejected
            overrides["temperature"] = max(config.teacher.temperature, config.retry_temperature)
        try:
            reply = await client.chat(messages, **overrides)
        except ChatError as error:
            if error.status in FATAL_STATUSES:
                raise FatalError(str(error)) from None
            log.warning("item %s (%s): %s", item.id, spec.kind, error)
            ledger.write(entry | {"status": "error", "error": str(error), "rejections": dict(own), **tokens})
            return "error"
        tokens["prompt_tokens"] += reply.prompt_tokens
        tokens["completion_tokens"] += reply.completion_tokens
        try:
            conversation = to_conversation(spec, item.id, reply.text)
            validate(conversation, spec)
        except Rejected as rejected:
            own[rejected.reason] += 1
            rejections[rejected.reason] += 1
            # the first few of each reason are shown: a teacher that ignores the format shows at once
            level = logging.WARNING if rejections[rejected.reason] <= LOG_FIRST else logging.DEBUG
            log.log(
                level, "item %s (%s): reply rejected, %s; it began %r", item.id, spec.kind, rejected, reply.text[:160]
            )
            continue
        ledger.write(
            entry
            | {"status": OK, "conversations": conversation, "attempts": attempt + 1, "rejections": dict(own), **tokens}
        )
        return OK
    ledger.write(entry | {"status": "rejected", "attempts": config.max_attempts, "rejections": dict(own), **tokens})
    return "rejected"


async def generate(
    config: GenerateConfig, source: Source, specs: dict[str, KindSpec], ledger: Ledger, client: ChatClient
) -> RunStats:
    """Run every pending job of `source` x `config.kinds`; the ledger holds the results."""
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
            status = await run_job(client, spec, item, config, ledger, rejections)
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
