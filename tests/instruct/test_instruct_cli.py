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


def test_help_lists_every_setting_with_its_docstring():
    done = subprocess.run(
        [sys.executable, "-m", "src.instruct", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    help_text = " ".join(done.stdout.split())
    for flag in ("--coco_captions", "--records", "--shards", "--kinds", "--max_attempts", "--teacher.base_url",
                 "--teacher.api_key_env", "--print_config"):  # fmt: skip
        assert flag in help_text
    assert "Replies asked for one sample before giving it up when each is rejected." in help_text
    assert "NAME of the environment variable holding the key" in help_text  # ChatConfig's own field docs
    assert "api_key " not in help_text  # there is no way to pass the key itself


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
    assert done.returncode == 2 and done.stderr == "error: Group 'teacher' does not accept option 'modle'\n"
    done = subprocess.run(
        [sys.executable, "-m", "src.instruct", "--max-attempts", "many", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == "error: Parser key \"max_attempts\": Expected a <class 'int'>. Got value: many\n"


def test_the_old_flags_resolve_as_jsonargparse_s(tmp_path):
    """argparse's spellings (dashes, the teacher's fields unprefixed, lists as several words, --no-X, none)
    give the settings jsonargparse's own flags give."""
    from src.instruct.config import parse_args

    old = ["--max-attempts", "5", "--model", "m", "--base-url", "http://h/v1", "--kinds", "detail", "conversation",
           "--no-progress", "--kind-limits", "detail=3", "conversation=4", "--limit", "none", "--shards", "a.tar",
           "b.tar", "--dry-run", "--api-key-env", "None"]  # fmt: skip
    new = ["--max_attempts", "5", "--teacher.model", "m", "--teacher.base_url", "http://h/v1",
           "--kinds", "[detail, conversation]", "--progress", "false", "--kind_limits", "{detail: 3, conversation: 4}",
           "--limit", "null", "--shards", "[a.tar, b.tar]", "--dry_run", "--teacher.api_key_env", "null"]  # fmt: skip
    assert parse_args(old) == parse_args(new)
    config, switches = parse_args(old)
    assert config.kinds == ["detail", "conversation"] and config.kind_limits == {"detail": 3, "conversation": 4}
    assert config.teacher.model == "m" and config.teacher.api_key_env is None and config.limit is None
    assert switches == {"verbose": False, "dry_run": True} and not config.progress


def test_flags_win_over_the_config_file_wherever_it_stands(tmp_path):
    from src.instruct.config import parse_args

    (tmp_path / "c.yaml").write_text("max_attempts: 7\nteacher: {model: from-file, max_retries: 2}\n")
    config, _ = parse_args(["--model", "from-flag", "--config", str(tmp_path / "c.yaml")])
    assert (config.max_attempts, config.teacher.model, config.teacher.max_retries) == (7, "from-flag", 2)


def test_print_config_prints_the_resolved_settings_and_they_load_back(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "src.instruct", "--config", str(ROOT / "experiments/instruct/local_vllm.yaml"),
         "--limit", "50", "--print_config"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    printed = yaml.safe_load(done.stdout)
    assert printed["limit"] == 50 and printed["teacher"]["model"] == "Qwen/Qwen2.5-7B-Instruct"
    (tmp_path / "printed.yaml").write_text(done.stdout)
    from src.instruct.config import load_config

    assert load_config(tmp_path / "printed.yaml").to_dict() == {
        k: v for k, v in printed.items() if k not in ("verbose", "dry_run")
    }


@pytest.mark.parametrize("name", ["local_vllm", "openai"])
def test_the_example_configs_load(name):
    from src.instruct.config import load_config

    config = load_config(ROOT / "experiments" / "instruct" / f"{name}.yaml")
    config.check()
    assert config.coco_captions and config.kinds == ["conversation", "detail", "complex_reasoning"]
    assert (config.teacher.api_key_env is None) == (name == "local_vllm")
