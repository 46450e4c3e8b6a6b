"""`python -m src.instruct` as users run it: a subprocess against the loopback server.

The key test scans every byte the run wrote; the kill test SIGKILLs the generator half way
and proves from the server's own request log that the restart repeats and loses nothing."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from chat_server import ChatServer, random_faults
from fake_teacher import Teacher, make_records, request_key

ROOT = Path(__file__).resolve().parents[2]


def write_config(path: Path, records: Path, out: Path, url: str, **teacher) -> Path:
    config = {
        "records": str(records),
        "images": str(records.parent / "images"),
        "out": str(out),
        "kinds": ["detail"],
        "max_count": 5,
        "teacher": {
            "base_url": url,
            "model": "teacher",
            "api_key_env": None,
            "timeout_s": 1.0,
            "max_concurrency": 4,
            "backoff_initial_s": 0.01,
            "backoff_max_s": 0.05,
            "max_retries": 10,
            "price_prompt_per_1k": 0.5,
            "price_completion_per_1k": 1.5,
        }
        | teacher,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def generator(config: Path, *flags: str, env: dict | None = None, **options) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "src.instruct", "--config", str(config), *flags],
        cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **options,
    )  # fmt: skip


def ledger_ids(path: Path) -> list[str]:
    """Ids of the whole lines of a ledger (a torn last line is not finished)."""
    data = path.read_bytes() if path.is_file() else b""
    return [json.loads(line)["id"] for line in data[: data.rfind(b"\n") + 1].splitlines()]


@pytest.mark.slow
def test_the_key_is_in_no_file_and_no_output(tmp_path, jpeg_bytes):
    key = "sk-test-" + secrets.token_hex(24)
    env = {"INSTRUCT_TEST_KEY": key}
    records = make_records(tmp_path / "in", 6, jpeg_bytes())
    faults = random_faults(0.3, seed=5, kinds=("429", "500", "drop", "garbage"))
    with ChatServer(Teacher(), faults=faults, api_key=key) as server:
        config = write_config(
            tmp_path / "run.yaml", records, tmp_path / "out", server.url, api_key_env="INSTRUCT_TEST_KEY"
        )
        done = generator(config, "--verbose", env=env)
        stdout, stderr = done.communicate(timeout=120)
        sent = [h.get("Authorization") for h in server.headers]
        # a wrong key: refused, the run stops, and the server echoes the key it got in its 401 body
        refused = generator(config, "--out", str(tmp_path / "refused"), env={"INSTRUCT_TEST_KEY": key + "-wrong"})
        refused_out, refused_err = refused.communicate(timeout=120)
    assert done.returncode == 0, stderr.decode()
    assert len(sent) >= 6 and set(sent) == {f"Bearer {key}"}  # the key is used, where it belongs
    assert b"samples: 6 (detail 6)" in stdout
    assert refused.returncode == 3 and b"HTTP 401" in refused_err and b"Bearer ***" in refused_err
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()] + [
        p for p in (tmp_path / "refused").rglob("*") if p.is_file()
    ]
    assert {p.name for p in written} >= {"ledger.jsonl", "instruct.json", "summary.json", "config.yaml", "sizes.json"}
    for path in written:
        assert key.encode() not in path.read_bytes(), path
    for text in (stdout, stderr, refused_out, refused_err):
        assert key.encode() not in text and key[8:20].encode() not in text
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["teacher"]["api_key_env"] == "INSTRUCT_TEST_KEY"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    tokens = summary["tokens"]
    assert summary["estimated_cost"] == pytest.approx(tokens["prompt"] / 1000 * 0.5 + tokens["completion"] / 1000 * 1.5)


@pytest.mark.slow
def test_a_killed_run_resumes_without_repeating_or_losing_items(tmp_path, jpeg_bytes):
    n = 40
    records = make_records(tmp_path / "in", n, jpeg_bytes())
    out = tmp_path / "out"
    ledger = out / "ledger.jsonl"
    faults = random_faults(0.15, seed=9, kinds=("429", "500", "drop"))
    with ChatServer(Teacher(), faults=faults, delay_s=0.1) as server:
        config = write_config(tmp_path / "run.yaml", records, out, server.url)
        first = generator(config)
        deadline = time.monotonic() + 60
        while len(ledger_ids(ledger)) < 12 and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert first.returncode == -signal.SIGKILL
        time.sleep(0.3)  # let the server finish the killed run's requests
        finished = set(ledger_ids(ledger))
        cutoff = len(server.requests)
        assert 12 <= len(finished) < n
        second = generator(config)
        stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 0, stderr.decode()
    # nothing finished before the kill was asked for again; everything else was
    asked_again = Counter(request_key(r)[0] for r in server.requests[cutoff:])
    assert not finished & set(asked_again)
    assert set(asked_again) == {str(i) for i in range(n)} - finished
    samples = json.loads((out / "instruct.json").read_text())
    assert sorted(s["source_id"] for s in samples) == sorted(str(i) for i in range(n))
    assert len(ledger_ids(ledger)) == n  # one line per item: none finished twice
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    assert sum(sizes.values()) == n and len(sizes) == n // 5


def test_help_lists_every_setting():
    done = subprocess.run(
        [sys.executable, "-m", "src.instruct", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    for flag in (
        "--coco-captions",
        "--records",
        "--shards",
        "--kinds",
        "--max-attempts",
        "--base-url",
        "--api-key-env",
    ):
        assert flag in done.stdout
    assert "--api-key " not in done.stdout  # there is no way to pass the key itself


def test_bad_settings_exit_with_a_clear_message(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "src.instruct", "--out", str(tmp_path), "--kinds", "poem", "--shards", "x.tar"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2 and "kinds must be distinct names" in done.stderr
    (tmp_path / "c.yaml").write_text("teacher:\n  modle: x\n")
    done = subprocess.run(
        [sys.executable, "-m", "src.instruct", "--config", str(tmp_path / "c.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "unknown teacher settings ['modle']" in done.stderr


@pytest.mark.parametrize("name", ["local_vllm", "openai"])
def test_the_example_configs_load(name):
    import argparse

    from src.instruct.config import build_config

    config = build_config(argparse.Namespace(config=ROOT / "experiments" / "instruct" / f"{name}.yaml"))
    config.check()
    assert config.coco_captions and config.kinds == ["conversation", "detail", "complex_reasoning"]
    assert (config.teacher.api_key_env is None) == (name == "local_vllm")
