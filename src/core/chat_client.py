"""One client for any OpenAI-compatible Chat Completions endpoint: the teacher that writes
instruction data (`src.instruct`) and the judge that scores answers (`src.eval`).

    async with ChatClient(ChatConfig(base_url="http://127.0.0.1:8000/v1", model="qwen2.5-7b")) as client:
        replies = await asyncio.gather(*(client.chat(messages) for messages in batch))

Callers may gather as many `chat()` calls as they like: the limits live inside the client.
Decisions, each for a reason:
- Concurrency is a semaphore around each request, and a request that is backing off before
  a retry keeps its slot: retries never add load beyond `max_concurrency`, and a server that
  says "slow down" sees the whole client slow down.
- Requests per minute and tokens per minute are paced, not windowed: request i starts no
  earlier than the spend of the requests before it allows at the configured rate, so no
  burst at the start of a minute trips a provider's limit. A request's tokens are counted,
  as providers count them, as its prompt (4 characters a token) plus `max_tokens`, and
  corrected by the usage the reply reports.
- 429, 408, 409 and every 5xx, timeouts (a whole-request deadline, not only httpx's
  per-read one), dropped connections and bodies that are not a Chat Completions reply are
  retried with exponential backoff and jitter; `Retry-After` (seconds or an HTTP date) and
  `retry-after-ms` are honoured, and a 429's pause holds every request of the client.
  Other 4xx (401, 400, 404 ...) are the caller's mistake: raised at once, never retried;
  after a 401 or 403 every later call fails the same way without being sent.
- The API key is read from the environment variable the config names, kept in a private
  attribute, sent only in the Authorization header, and scrubbed from every message this
  module produces; `ChatConfig` holds the variable's name, so saving a config saves no key.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import httpx

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 409, 429})  # and every 5xx
REFUSED_STATUSES = frozenset({401, 403})  # the key is refused: later calls fail at once, unsent
LOG_FIRST = 3  # retries of each kind logged as warnings; later ones at debug level


@dataclass
class ChatConfig:
    """How to reach the teacher or judge, and how hard to push it."""

    base_url: str = "http://127.0.0.1:8000/v1"
    """Any OpenAI-compatible server; requests go to POST {base_url}/chat/completions."""
    model: str = "gpt-4o-mini"
    api_key_env: str | None = "OPENAI_API_KEY"
    """NAME of the environment variable holding the key (None: send no key, as local servers want)."""
    temperature: float = 0.2
    top_p: float | None = None
    max_tokens: int = 1024
    timeout_s: float = 60.0
    """Deadline for one request, connection to last byte."""
    max_concurrency: int = 8
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_retries: int = 6
    """Retries after the first attempt before giving up with ChatError."""
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    price_prompt_per_1k: float = 0.0
    """Price per 1000 prompt tokens, for the cost estimate in summaries."""
    price_completion_per_1k: float = 0.0

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {self.max_concurrency}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be at least 0, got {self.max_retries}")
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or null, got {value}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")


@dataclass
class ChatReply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None


class ChatError(RuntimeError):
    """Gave up after retries, or a status that retrying cannot fix (401, 400 ...).
    Its message never contains the API key."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _Retryable(Exception):
    """One failed attempt worth another; `kind` is what usage['retry_reasons'] counts."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind, self.retry_after = kind, retry_after


class Pacer:
    """Spaces spending at `per_minute`: each `acquire(amount)` waits until the amounts acquired
    before it are paid for at that rate. Over any minute at most `per_minute` plus one
    request's amount is spent. `refund` corrects an estimate once the real amount is known."""

    def __init__(self, per_minute: float) -> None:
        self.rate = per_minute / 60.0
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self, amount: float) -> None:
        async with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + amount / self.rate
        if start > now:
            await asyncio.sleep(start - now)

    def refund(self, amount: float) -> None:
        """Give back (or, negative, charge more) `amount` the last estimate was off by."""
        self._next = max(time.monotonic(), self._next - amount / self.rate)


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` as seconds or an HTTP date."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def estimate_tokens(messages: list[dict[str, str]]) -> int:
    """Rough prompt tokens (4 characters each, plus a few per message), for rate limiting only."""
    return sum(math.ceil(len(str(m.get("content", ""))) / 4) + 4 for m in messages)


class ChatClient:
    """Async Chat Completions client with retries, concurrency and rate limits (see module doc)."""

    def __init__(self, config: ChatConfig) -> None:
        self.config = config
        self._key = _read_key(config.api_key_env)
        self._http: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self._requests = Pacer(config.requests_per_minute) if config.requests_per_minute else None
        self._tokens = Pacer(config.tokens_per_minute) if config.tokens_per_minute else None
        self._paused_until = 0.0
        self._refused: ChatError | None = None
        self._usage: Counter[str] = Counter()
        self._reasons: Counter[str] = Counter()

    def __repr__(self) -> str:  # the key is not in it; the config holds only the variable's name
        return f"ChatClient(base_url={self.config.base_url!r}, model={self.config.model!r})"

    @property
    def usage(self) -> dict:
        """Counts so far: requests (HTTP attempts), retries, failures (calls given up),
        prompt_tokens, completion_tokens, cost, and retry_reasons by kind."""
        prompt, completion = self._usage["prompt_tokens"], self._usage["completion_tokens"]
        cost = prompt / 1000 * self.config.price_prompt_per_1k + completion / 1000 * self.config.price_completion_per_1k
        return {
            "requests": self._usage["requests"],
            "retries": self._usage["retries"],
            "failures": self._usage["failures"],
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "cost": round(cost, 6),
            "retry_reasons": dict(sorted(self._reasons.items())),
        }

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _client(self) -> httpx.AsyncClient:
        # made on first use, inside the running event loop
        if self._http is None:
            headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
            limits = httpx.Limits(max_connections=self.config.max_concurrency)
            # proxies and CA bundles from the environment apply, except to a server on this machine
            local = urlparse(self.config.base_url).hostname in ("127.0.0.1", "localhost", "::1")
            self._http = httpx.AsyncClient(
                headers=headers, timeout=httpx.Timeout(self.config.timeout_s), limits=limits, trust_env=not local
            )
            self._slots = asyncio.Semaphore(self.config.max_concurrency)
        return self._http

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    async def chat(self, messages: list[dict[str, str]], **overrides: Any) -> ChatReply:
        """One Chat Completions call, retried as the module doc says; raises ChatError.

        `overrides` replace request fields per call (temperature, max_tokens, top_p, seed, ...)."""
        config = self.config
        body: dict[str, Any] = {
            "model": config.model,
            "messages": messages,
            "temperature": config.temperature,
            "max_tokens": config.max_tokens,
        }
        if config.top_p is not None:
            body["top_p"] = config.top_p
        body.update({k: v for k, v in overrides.items() if v is not None})
        http = self._client()
        url = config.base_url.rstrip("/") + "/chat/completions"
        estimate = estimate_tokens(messages) + int(body.get("max_tokens") or 0)
        async with self._slots:
            for attempt in range(config.max_retries + 1):
                await self._wait_for_budget(estimate)
                if self._refused is not None:  # the key was refused: every request would be
                    self._usage["failures"] += 1
                    raise ChatError(str(self._refused), self._refused.status)
                self._usage["requests"] += 1
                try:
                    reply = await asyncio.wait_for(self._attempt(http, url, body), timeout=config.timeout_s)
                except ChatError:  # not worth retrying (400, 401 ...)
                    self._usage["failures"] += 1
                    raise
                except (asyncio.TimeoutError, httpx.TimeoutException):
                    failure = _Retryable("timeout", f"no complete reply within {config.timeout_s} s")
                except httpx.TransportError as error:  # dropped connection, refused, reset ...
                    failure = _Retryable("connection", f"{type(error).__name__}: {error}")
                except _Retryable as error:
                    failure = error
                else:
                    self._usage["prompt_tokens"] += reply.prompt_tokens
                    self._usage["completion_tokens"] += reply.completion_tokens
                    used = reply.prompt_tokens + reply.completion_tokens
                    if self._tokens is not None and used:  # a server that reports no usage keeps the estimate
                        self._tokens.refund(estimate - used)
                    return reply
                self._reasons[failure.kind] += 1
                if attempt == config.max_retries:
                    self._usage["failures"] += 1
                    raise ChatError(
                        self._scrub(f"{url}: gave up after {attempt + 1} attempts; last: {failure}"), status=None
                    )
                self._usage["retries"] += 1
                delay = self._backoff(attempt, failure.retry_after)
                # the first few of each kind are warnings, then debug: the counts are in `usage`
                level = logging.WARNING if self._reasons[failure.kind] <= LOG_FIRST else logging.DEBUG
                log.log(level, "%s (attempt %d); retrying in %.2f s", self._scrub(str(failure)), attempt + 1, delay)
                await asyncio.sleep(delay)  # the slot is kept: a retry adds no load beyond the limit
        raise AssertionError("unreachable")

    async def _wait_for_budget(self, tokens: int) -> None:
        while (pause := self._paused_until - time.monotonic()) > 0:
            await asyncio.sleep(pause)
        if self._requests is not None:
            await self._requests.acquire(1)
        if self._tokens is not None:
            await self._tokens.acquire(tokens)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with equal jitter, at least what the server asked for."""
        base = min(self.config.backoff_max_s, self.config.backoff_initial_s * 2**attempt)
        delay = base / 2 + random.uniform(0, base / 2)
        if retry_after is not None:
            delay = max(delay, retry_after)
            # every request of this client waits out the server's pause, not only this one
            self._paused_until = max(self._paused_until, time.monotonic() + retry_after)
        return delay

    async def _attempt(self, http: httpx.AsyncClient, url: str, body: dict) -> ChatReply:
        response = await http.post(url, json=body)
        status = response.status_code
        if status in RETRY_STATUSES or status >= 500:
            raise _Retryable(
                f"http_{status}", f"HTTP {status}: {_snippet(response.text)}", parse_retry_after(response.headers)
            )
        if status >= 400:
            error = ChatError(self._scrub(f"{url}: HTTP {status} (not retried): {_snippet(response.text)}"), status)
            if status in REFUSED_STATUSES:
                self._refused = error
            raise error
        try:
            data = response.json()
            choice = data["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError(f"content is {type(text).__name__}")
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise _Retryable("malformed", f"not a chat completion ({error!r}): {_snippet(response.text)}") from None
        usage = data.get("usage") or {}
        return ChatReply(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason=choice.get("finish_reason"),
        )


def _snippet(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _read_key(env: str | None) -> str | None:
    if not env:
        return None
    key = os.environ.get(env, "").strip()
    if not key:
        raise ChatError(
            f"environment variable {env} (api_key_env) is not set or empty; set it to the API key, "
            "or set api_key_env to null for a server that takes no key"
        )
    return key
