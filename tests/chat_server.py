"""A real Chat Completions server on loopback for the tests, with faults on a schedule.

    with ChatServer(lambda request: "Hello", faults={0: "429", 3: "drop"}) as server:
        client = ChatClient(ChatConfig(base_url=server.url, api_key_env=None))

`http.server.ThreadingHTTPServer` on 127.0.0.1 (a free port) in a background thread:
POST /v1/chat/completions answers in OpenAI's format with the text `respond(request_json)`
returns (finish_reason "stop"), or with `(text, finish_reason)` when it returns a pair (e.g.
"length" for a reply cut off at max_tokens); GET /v1/models lists one model. Faults, by
request number (0-based, in arrival order over all requests) or from a callable:
    "429"        429 with Retry-After: `retry_after` seconds
    "500", "503" a server error
    "slow"       holds the request `slow_s` seconds (past the client's timeout), then answers
    "drop"       closes the connection without a response
    "garbage"    200 with a body that is not JSON
    "no_choices" 200 with JSON that has no `choices`
    "401"        401 Unauthorized
`max_concurrent` is the most requests the server was working on at once. A request counts
from its arrival until just before its response is sent (or the client is seen to hang up),
so a client that waits for each response before sending its next request can never be seen
over its own limit.
"""

from __future__ import annotations

import json
import random
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = ("429", "500", "503", "slow", "drop", "garbage", "no_choices", "401")

FaultPlan = Mapping[int, str] | Callable[[int, dict], "str | None"] | None


def random_faults(rate: float, seed: int = 0, kinds: tuple[str, ...] = ("429", "500", "drop", "garbage")):
    """A fault plan: each request number gets a fault with probability `rate`, the same for a
    given seed and number whatever the thread timing."""

    def plan(number: int, request: dict) -> str | None:
        rng = random.Random(seed * 1_000_003 + number)
        return rng.choice(kinds) if rng.random() < rate else None

    return plan


class ChatServer:
    def __init__(
        self,
        respond: Callable[[dict], str | tuple[str, str]],
        faults: FaultPlan = None,
        delay_s: float = 0.0,
        retry_after: float = 0.05,
        slow_s: float = 2.0,
        api_key: str | None = None,
        model: str = "test-teacher",
    ) -> None:
        """`delay_s`: every answer takes this long (to make concurrency visible). `api_key`:
        requests without `Authorization: Bearer <api_key>` get 401."""
        for fault in faults.values() if isinstance(faults, Mapping) else ():
            if fault not in FAULTS:
                raise ValueError(f"unknown fault {fault!r}; choose from {FAULTS}")
        self.respond, self.faults, self.delay_s = respond, faults, delay_s
        self.retry_after, self.slow_s, self.api_key, self.model = retry_after, slow_s, api_key, model
        self.requests: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.times: list[float] = []
        self.served: Counter[str] = Counter()  # "ok" and each fault, as served
        self.in_flight = 0
        self.max_concurrent = 0
        self.lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> ChatServer:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def start(self) -> None:
        server = self

        class Handler(_Handler):
            owner = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    # ------------------------------------------------------------ bookkeeping

    def _arrive(self, body: dict, headers: dict[str, str]) -> str | None:
        with self.lock:
            number = len(self.requests)
            self.requests.append(body)
            self.headers.append(headers)
            self.times.append(time.monotonic())
            self.in_flight += 1
            self.max_concurrent = max(self.max_concurrent, self.in_flight)
            if isinstance(self.faults, Mapping):
                return self.faults.get(number)
            return self.faults(number, body) if self.faults is not None else None

    def _leave(self, outcome: str) -> None:
        with self.lock:
            self.in_flight -= 1
            self.served[outcome] += 1

    def completion(self, request: dict, text: str, finish_reason: str = "stop") -> dict:
        prompt = sum(len(str(m.get("content", "")).split()) for m in request.get("messages", []))
        completion = len(text.split())
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", self.model),
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
            ],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers and httpx use it
    owner: ChatServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, json.dumps({"object": "list", "data": [{"id": self.owner.model}]}).encode())
        else:
            self._send(404, b'{"error": {"message": "not found"}}')

    def do_POST(self) -> None:
        server = self.owner
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, b'{"error": {"message": "not found"}}')
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._send(400, b'{"error": {"message": "body is not JSON"}}')
            return
        fault = server._arrive(body, dict(self.headers.items()))
        if server.api_key is not None and self.headers.get("Authorization") != f"Bearer {server.api_key}":
            fault = "401"
        if fault is not None and fault not in FAULTS:  # a plan's typo shows, rather than passing as "ok"
            server._leave(f"unknown fault {fault!r}")
            self._send(500, json.dumps({"error": {"message": f"test server: unknown fault {fault!r}"}}).encode())
            return
        if fault == "slow":
            if self._client_hung_up(server.slow_s):
                server._leave("slow")
                self.close_connection = True
                return
        elif server.delay_s:
            time.sleep(server.delay_s)
        if fault == "drop":
            server._leave("drop")
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if fault in ("429", "500", "503", "401"):
            server._leave(fault)
            headers = {"Retry-After": f"{server.retry_after:g}"} if fault == "429" else None
            text = f"injected {fault}"
            if fault == "401":  # the worst real servers do: echo the key they were sent
                text = f"Incorrect API key provided: {self.headers.get('Authorization', '')}"
            message = json.dumps({"error": {"message": text, "type": "test"}}).encode()
            self._send(int(fault), message, headers)
            return
        if fault == "garbage":
            server._leave(fault)
            self._send(200, b"<html>upstream proxy error</html>")
            return
        if fault == "no_choices":
            server._leave(fault)
            self._send(200, json.dumps({"id": "x", "object": "chat.completion", "usage": {}}).encode())
            return
        answer = server.respond(body)
        text, finish_reason = answer if isinstance(answer, tuple) else (answer, "stop")
        server._leave(fault or "ok")
        self._send(200, json.dumps(server.completion(body, text, finish_reason)).encode())

    def _client_hung_up(self, seconds: float) -> bool:
        """Wait up to `seconds`; True as soon as the client closes the connection."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.connection], [], [], left)
            if readable:
                try:
                    if self.connection.recv(1, socket.MSG_PEEK) == b"":
                        return True
                except OSError:
                    return True
                time.sleep(min(left, 0.01))  # data (a pipelined request): keep waiting
        return False
