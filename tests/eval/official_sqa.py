"""LLaVA's own ScienceQA scorer, run as it is, and ScienceQA's table over its decisions.

The scorer is `llava/eval/eval_science_qa.py` of the `llava-torch==1.2.2.post1` wheel (the same
file as haotian-liu/LLaVA's), installed without its dependencies (`noxfile.py` does it for CI).
Nothing of it is copied here: the tests run the installed file, as a subprocess or with
`runpy` (the same file, in this process, for the many small runs of the property tests).

It writes two files: `--output-file` with every question under `correct` / `incorrect`
(`parsed_ans`: the letter it read, or "FAILED") and `--output-result` in ScienceQA's result
layout (`results`: pid -> option index, -1 for none; `acc`). It prints only the overall and an
"IMG" accuracy; the paper's per-column table is ScienceQA's own `get_scores`
(lupantech/ScienceQA, `tools/evaluate_acc.py`) over that result file: `scienceqa_table` below
groups the official decisions by its rules, written here from that function, independently of
the kit's `src.eval.scienceqa_data.categories`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

LLAVA_TORCH = "1.2.2.post1"


def official_script(name: str = "eval_science_qa.py") -> Path:
    """The installed official file; skips with the reason when llava-torch is missing, and fails
    instead when the CI variable is set (CI must test against the real thing)."""
    try:
        version = importlib.metadata.version("llava-torch")
    except importlib.metadata.PackageNotFoundError:
        version = None
    spec = importlib.util.find_spec("llava") if version else None  # finds the package without importing it
    path = Path(spec.submodule_search_locations[0]) / "eval" / name if spec else None
    if version != LLAVA_TORCH or path is None or not path.is_file():
        found = f"found llava-torch {version}" if version else "llava-torch is not installed"
        reason = f"the official LLaVA scorer is needed: pip install --no-deps llava-torch=={LLAVA_TORCH} ({found})"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{reason}; CI runs these tests against it", pytrace=False)
        pytest.skip(reason)
    return path


def write_release(root: Path, problems: dict[str, dict], splits: dict[str, list[str]]) -> Path:
    """problems.json and pid_splits.json (all that scoring reads) under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps(splits))
    return root


def write_results(path: Path, replies: dict[str, str], problems: dict[str, dict]) -> Path:
    """A result JSONL as LLaVA's `model_vqa_science.py` writes it (`prompt` starts with
    `<image>\\n` for a question with an image, as there)."""
    rows = []
    for pid, text in replies.items():
        image = "<image>\n" if problems.get(pid, {}).get("image") else ""
        prompt = f"{image}Context: N/A\nQuestion: question {pid}?\nOptions: (A) x (B) y"
        rows.append(
            {
                "question_id": pid,
                "prompt": prompt,
                "text": text,
                "answer_id": f"a{pid}",
                "model_id": "llava",
                "metadata": {},
            }
        )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_official(
    root: Path,
    results: Path,
    out: Path,
    split: str = "test",
    options: str | None = None,
    in_process: bool = False,
) -> dict:
    """Runs eval_science_qa.py on the files; returns its stdout, `results` (pid -> index, -1:
    none), `parsed` (pid -> the letter it read or "FAILED") and `acc`. `options` is passed as
    `--options` (a string: its `type=list` makes it a list of letters)."""
    script = official_script()
    argv = ["--base-dir", str(root), "--result-file", str(results), "--split", split]
    argv += ["--output-file", str(out / "official_output.json"), "--output-result", str(out / "official_result.json")]
    if options is not None:
        argv += ["--options", options]
    if in_process:
        stdout = io.StringIO()
        saved = sys.argv
        sys.argv = [str(script), *argv]
        try:
            with contextlib.redirect_stdout(stdout):
                runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = saved
        printed = stdout.getvalue()
    else:
        done = subprocess.run(
            [sys.executable, str(script), *argv], capture_output=True, text=True, check=False, timeout=120
        )
        assert done.returncode == 0, done.stderr
        printed = done.stdout
    output = json.loads((out / "official_output.json").read_text())
    result = json.loads((out / "official_result.json").read_text())
    parsed = {row["question_id"]: row["parsed_ans"] for row in output["correct"] + output["incorrect"]}
    return {"stdout": printed, "results": result["results"], "parsed": parsed, "acc": result["acc"]}


def scienceqa_table(problems: dict[str, dict], pids: list[str], predicted: dict[str, int]) -> dict[str, float]:
    """ScienceQA's `get_scores` columns (percent, 2 decimals) of per-question predicted indices."""
    grades_low = [f"grade{g}" for g in range(1, 7)]
    grades_high = [f"grade{g}" for g in range(7, 13)]
    columns = {
        "NAT": lambda p: p["subject"] == "natural science",
        "SOC": lambda p: p["subject"] == "social science",
        "LAN": lambda p: p["subject"] == "language science",
        "TXT": lambda p: bool(p["hint"]),
        "IMG": lambda p: bool(p["image"]),
        "NO": lambda p: not p["hint"] and not p["image"],
        "G1-6": lambda p: p["grade"] in grades_low,
        "G7-12": lambda p: p["grade"] in grades_high,
    }
    right = {pid: predicted[pid] == problems[pid]["answer"] for pid in pids}
    table = {}
    for name, member in columns.items():
        chosen = [pid for pid in pids if member(problems[pid])]
        table[name] = float(f"{sum(right[p] for p in chosen) / len(chosen) * 100:.2f}") if chosen else None
    table["Avg"] = float(f"{sum(right.values()) / len(pids) * 100:.2f}")
    return table
