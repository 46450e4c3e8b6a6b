"""The record of finished work that lets a killed run resume without repeating or losing items.

An append-only JSONL file, one line per (item id, kind) as it finishes, flushed and fsynced
before the next is written: a line on disk is a sample that will never be requested again.
A run killed mid-write leaves at most a torn last line; opening the ledger cuts it off (it was
not finished, so it is requested again) and appending goes on from the last whole line. The
last line for a key wins: an item that failed (`status` "rejected" or "error") is retried by
the next run, and its new line replaces the old one's verdict.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
from typing import Any

log = logging.getLogger(__name__)

OK = "ok"


class Ledger:
    """Opening it takes an exclusive lock on the file: two runs writing one output folder at
    once would ask for the same items twice, so the second is refused."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.entries: dict[tuple[str, str], dict] = {}
        self.history: list[dict] = []  # every line, failures included (for the summary)
        self.torn = 0
        self._stream = open(self.path, "a+b")
        try:
            self._lock()
            self._load()
        except BaseException:
            self._stream.close()
            raise

    def _lock(self) -> None:
        if fcntl is None:  # not on a POSIX system: no guard
            return
        try:
            fcntl.flock(self._stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{self.path} is in use by another run writing the same output folder") from None

    def _load(self) -> None:
        self._stream.seek(0)
        data = self._stream.read()
        whole = data.rfind(b"\n") + 1  # bytes up to the last whole line
        if whole < len(data):
            self.torn = 1
            log.warning("%s: cut a torn last line (%d bytes) left by a killed run", self.path, len(data) - whole)
            self._stream.truncate(whole)
        for number, line in enumerate(data[:whole].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                key = (str(entry["id"]), str(entry["kind"]))
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(
                    f"{self.path} line {number} is not a ledger entry ({error!r}); fix or remove it"
                ) from None
            self.entries[key] = entry
            self.history.append(entry)

    def done(self, item_id: str, kind: str) -> bool:
        entry = self.entries.get((item_id, kind))
        return entry is not None and entry.get("status") == OK

    def ok(self) -> dict[tuple[str, str], dict]:
        return {key: entry for key, entry in self.entries.items() if entry.get("status") == OK}

    def write(self, entry: dict[str, Any]) -> None:
        """Append one finished entry durably (fsync) before returning."""
        line = json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n"
        self._stream.write(line.encode("utf-8"))
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self.entries[(str(entry["id"]), str(entry["kind"]))] = entry
        self.history.append(entry)

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
