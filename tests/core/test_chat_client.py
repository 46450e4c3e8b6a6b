"""The shared Chat Completions client against a real loopback server that injects faults."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import secrets
import time

import httpx
import pytest
from chat_server import ChatServer, random_faults

from src.core.chat_client import ChatClient, ChatConfig, ChatError, parse_retry_after

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello"}]


def config(server: ChatServer, **overrides) -> ChatConfig:
    """Fast settings for tests: short backoff, no key unless asked."""
    options = dict(
        base_url=server.url, model="teacher", api_key_env=None, backoff_initial_s=0.01, backoff_max_s=0.1, timeout_s=5
    )
    return ChatConfig(**(options | overrides))


def run(coroutine):
    return asyncio.run(coroutine)


async def one_call(cfg: ChatConfig, messages=MESSAGES, **overrides):
    async with ChatClient(cfg) as client:
        return await client.chat(messages, **overrides), client.usage


def echo(request: dict) -> str:
    return "echo: " + request["messages"][-1]["content"]


def test_chat_sends_the_request_and_returns_text_and_usage(monkeypatch):
    monkeypatch.setenv("TEST_TEACHER_KEY", "sk-test-123")
    with ChatServer(echo) as server:
        cfg = config(server, api_key_env="TEST_TEACHER_KEY", temperature=0.7, max_tokens=99, top_p=0.9)
        reply, usage = run(one_call(cfg, seed=5, max_tokens=50))
    assert reply.text == "echo: Say hello"
    assert reply.finish_reason == "stop"
    assert (reply.prompt_tokens, reply.completion_tokens) == (5, 3)  # the server counts words
    body = server.requests[0]
    assert body["model"] == "teacher" and body["messages"] == MESSAGES
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (0.7, 0.9, 50, 5)
    assert server.headers[0]["Authorization"] == "Bearer sk-test-123"
    assert usage == {
        "requests": 1,
        "retries": 0,
        "failures": 0,
        "prompt_tokens": 5,
        "completion_tokens": 3,
        "cost": 0.0,
        "retry_reasons": {},
    }


def test_cost_estimate_uses_the_configured_prices():
    with ChatServer(lambda r: "one two three four") as server:
        _, usage = run(one_call(config(server, price_prompt_per_1k=2.0, price_completion_per_1k=10.0)))
    assert usage["cost"] == pytest.approx(5 / 1000 * 2.0 + 4 / 1000 * 10.0)


def test_no_authorization_header_without_a_key_env():
    with ChatServer(echo) as server:
        run(one_call(config(server)))
    assert "Authorization" not in server.headers[0]


def test_429_is_retried_after_the_servers_retry_after():
    with ChatServer(echo, faults={0: "429"}, retry_after=0.4) as server:
        reply, usage = run(one_call(config(server)))
    assert reply.text == "echo: Say hello"
    assert len(server.requests) == 2
    # the backoff alone would be ~0.01 s: the wait is the server's
    assert server.times[1] - server.times[0] >= 0.39
    assert usage["retries"] == 1 and usage["retry_reasons"] == {"http_429": 1}


def test_server_errors_dropped_connections_and_malformed_bodies_are_retried():
    faults = {0: "500", 1: "503", 2: "drop", 3: "garbage", 4: "no_choices"}
    with ChatServer(echo, faults=faults) as server:
        reply, usage = run(one_call(config(server)))
    assert reply.text == "echo: Say hello"
    assert len(server.requests) == 6
    assert usage["retry_reasons"] == {"connection": 1, "http_500": 1, "http_503": 1, "malformed": 2}
    assert (usage["requests"], usage["retries"], usage["failures"]) == (6, 5, 0)


def test_backoff_grows_exponentially():
    with ChatServer(echo, faults={0: "500", 1: "500", 2: "500", 3: "500"}) as server:
        run(one_call(config(server, backoff_initial_s=0.05, backoff_max_s=10)))
    gaps = [b - a for a, b in zip(server.times, server.times[1:], strict=False)]
    # equal jitter: the wait after attempt n lies in [base/2, base], base = 0.05 * 2**n
    for n, gap in enumerate(gaps):
        assert 0.05 * 2**n / 2 - 0.005 <= gap <= 0.05 * 2**n + 0.3, gaps


def test_a_reply_slower_than_the_timeout_is_abandoned_and_retried():
    with ChatServer(echo, faults={0: "slow"}, slow_s=3.0) as server:
        start = time.monotonic()
        reply, usage = run(one_call(config(server, timeout_s=0.3)))
        elapsed = time.monotonic() - start
        deadline = time.monotonic() + 2
        while server.served["slow"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert reply.text == "echo: Say hello"
    assert elapsed < 1.5  # did not wait the 3 s out
    assert usage["retry_reasons"] == {"timeout": 1}
    assert server.served["slow"] == 1  # the server saw the client hang up


def test_gives_up_after_max_retries_with_a_clear_error():
    with ChatServer(echo, faults=lambda number, request: "500") as server:
        with pytest.raises(ChatError, match=r"gave up after 3 attempts; last: HTTP 500: .*injected 500"):
            run(one_call(config(server, max_retries=2)))
    assert len(server.requests) == 3


def test_401_is_not_retried_and_the_key_never_shows(monkeypatch, caplog):
    key = "sk-" + secrets.token_hex(16)
    monkeypatch.setenv("TEST_TEACHER_KEY", key)
    caplog.set_level(logging.DEBUG)
    with ChatServer(echo, api_key="the-right-key") as server:
        cfg = config(server, api_key_env="TEST_TEACHER_KEY")
        with pytest.raises(ChatError) as caught:
            run(one_call(cfg))
        client = ChatClient(cfg)
    assert len(server.requests) == 1
    assert caught.value.status == 401
    # the server echoed the key it was sent; the client's error shows it scrubbed
    assert "Incorrect API key provided: Bearer ***" in str(caught.value)
    for text in (str(caught.value), repr(caught.value), repr(client), repr(cfg), str(vars(cfg)), caplog.text):
        assert key not in text


def test_retry_logs_never_hold_the_key(monkeypatch, caplog):
    key = "sk-" + secrets.token_hex(16)
    monkeypatch.setenv("TEST_TEACHER_KEY", key)
    caplog.set_level(logging.DEBUG)
    with ChatServer(echo, faults={0: "500", 1: "drop", 2: "garbage", 3: "slow"}, slow_s=1) as server:
        run(one_call(config(server, api_key_env="TEST_TEACHER_KEY", timeout_s=0.3)))
    assert caplog.text.count("retrying in") == 4
    assert key not in caplog.text


def test_a_missing_key_variable_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ChatError, match="environment variable NO_SUCH_KEY_VAR .* is not set"):
        ChatClient(ChatConfig(api_key_env="NO_SUCH_KEY_VAR"))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_concurrency"):
        ChatConfig(max_concurrency=0)
    with pytest.raises(ValueError, match="requests_per_minute"):
        ChatConfig(requests_per_minute=0)


def test_concurrency_limit_holds_under_faults():
    faults = random_faults(0.3, seed=1, kinds=("429", "500", "drop", "garbage", "slow"))
    with ChatServer(echo, faults=faults, delay_s=0.03, slow_s=1.0) as server:

        async def main():
            async with ChatClient(config(server, max_concurrency=3, timeout_s=0.3, max_retries=20)) as client:
                messages = [[{"role": "user", "content": f"item {i}"}] for i in range(30)]
                return await asyncio.gather(*(client.chat(m) for m in messages)), client.usage

        replies, usage = run(main())
    assert [r.text for r in replies] == [f"echo: item {i}" for i in range(30)]
    assert server.max_concurrent == 3  # reached, never passed
    assert usage["retries"] > 5 and server.served["ok"] == 30
    assert sum(server.served.values()) == len(server.requests) == usage["requests"]


def most_in_a_window(times: list[float], width: float) -> int:
    return max(sum(start <= t < start + width for t in times) for start in times)


def test_requests_per_minute_are_paced():
    with ChatServer(echo) as server:

        async def main():
            async with ChatClient(config(server, max_concurrency=8, requests_per_minute=600)) as client:
                await asyncio.gather(*(client.chat(MESSAGES) for _ in range(6)))

        run(main())
    times = sorted(server.times)
    # 600 a minute: one every 0.1 s. Counted in windows, so a late wake-up cannot fail the test;
    # unpaced, all six would arrive within milliseconds
    assert most_in_a_window(times, 0.25) <= 4, times
    assert times[-1] - times[0] >= 0.45


def test_tokens_per_minute_are_paced():
    # 60,000 a minute = 1,000 a second; each request counts 50 prompt (200 chars) + 4 + 200 max_tokens
    content = "x" * 200
    with ChatServer(echo) as server:

        async def main():
            cfg = config(server, max_concurrency=8, tokens_per_minute=60_000, max_tokens=200)
            async with ChatClient(cfg) as client:
                await asyncio.gather(*(client.chat([{"role": "user", "content": content}]) for _ in range(4)))

        run(main())
    times = sorted(server.times)
    # 254 tokens at 1,000 a second: one request every 0.254 s
    assert most_in_a_window(times, 0.4) <= 2, times
    assert times[-1] - times[0] >= 0.7


def test_parse_retry_after_reads_seconds_dates_and_milliseconds():
    assert parse_retry_after(httpx.Headers({"Retry-After": "7"})) == 7.0
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "250", "Retry-After": "7"})) == 0.25
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= parse_retry_after(httpx.Headers({"Retry-After": when})) <= 31
    assert parse_retry_after(httpx.Headers({"Retry-After": "soon"})) is None
    assert parse_retry_after(httpx.Headers({})) is None


def test_after_a_refused_key_later_calls_fail_unsent():
    with ChatServer(echo, api_key="the-right-key") as server:

        async def main():
            async with ChatClient(config(server, max_concurrency=2)) as client:
                return await asyncio.gather(*(client.chat(MESSAGES) for _ in range(10)), return_exceptions=True)

        outcomes = run(main())
    assert all(isinstance(o, ChatError) and o.status == 401 for o in outcomes)
    assert len(server.requests) <= 2  # those in flight when the first 401 came back


def test_a_429s_retry_after_pauses_every_request_of_the_client():
    def respond(request):
        if request["messages"][-1]["content"] == "B":
            time.sleep(0.3)
        return "ok"

    first_a = {"seen": False}

    def faults(number, request):  # A's first request is told to come back in 0.5 s
        if request["messages"][-1]["content"] == "A" and not first_a["seen"]:
            first_a["seen"] = True
            return "429"
        return None

    with ChatServer(respond, faults=faults, retry_after=0.5) as server:

        async def main():
            async with ChatClient(config(server, max_concurrency=2)) as client:
                calls = [client.chat([{"role": "user", "content": name}]) for name in "ABC"]
                await asyncio.gather(*calls)

        run(main())
    arrivals = {}
    for request, at in zip(server.requests, server.times, strict=True):
        arrivals.setdefault(request["messages"][-1]["content"], []).append(at)
    start = arrivals["A"][0]
    # C got B's slot at 0.3 s but waited out the pause A was told about
    assert arrivals["C"][0] - start >= 0.48
    assert arrivals["A"][1] - start >= 0.48 and arrivals["B"][0] - start < 0.1
