"""Shared pieces of the benchmark tests: tiny images, predictions files, reply pools, scoring."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image

from src.eval.benchmarks import get_benchmark


def write_image(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path, format="PNG")
    return path


def write_predictions(path: Path, replies: dict[str, str]) -> Path:
    path.write_text(
        "".join(json.dumps({"id": key, "answer": text, "model": "m"}) + "\n" for key, text in replies.items())
    )
    return path


def pick(pool: list[str], count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(pool) for _ in range(count)]


def evaluate(name: str, replies: dict[str, str], **release_args) -> tuple[list, dict]:
    """(questions, evaluate()'s result) of the kit's scorer on a release and replies by id."""
    benchmark = get_benchmark(name)
    release = benchmark.load(argparse.Namespace(**release_args))
    answers = {key: {"text": text, "model": None} for key, text in replies.items()}
    return release.questions, benchmark.evaluate(release.questions, answers)
