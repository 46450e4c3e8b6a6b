"""The random choices made for each sample, seeded so that a rerun or a resumed run makes the
same ones: the detail kind's question, and where the `<image>` tag goes.

Each choice draws from its own generator, seeded by the run's `seed`, the choice's name, the
kind and the item id (Python's `random.Random` hashes a string seed with SHA-512, so the draw
is the same in every process and on every machine, whatever PYTHONHASHSEED is). A sample's
draws depend on nothing else: not on the order replies come back, not on which items were
done before a resume.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

IMAGE_POSITIONS = ("front", "random")
"""front: `<image>\\n` opens the first question (what LLaVA's trainer does to every sample anyway);
random: before or after the first question, half and half (the paper's Eq. 2)."""


def sample_rng(seed: int, purpose: str, kind: str, item_id: str) -> random.Random:
    return random.Random(f"{seed}\x1f{purpose}\x1f{kind}\x1f{item_id}")


def pick_question(questions: Sequence[str], seed: int, item_id: str, kind: str = "detail") -> str:
    """The human turn of a single-answer sample: one question from the list."""
    if not questions:
        raise ValueError("no question to pick from")
    return sample_rng(seed, "question", kind, item_id).choice(list(questions))


def image_first(position: str, seed: int, item_id: str, kind: str) -> bool:
    """Whether `<image>` goes before the first question (else after it)."""
    if position not in IMAGE_POSITIONS:
        raise ValueError(f"unknown image_position {position!r}; choose from {list(IMAGE_POSITIONS)}")
    return position == "front" or sample_rng(seed, "image", kind, item_id).random() < 0.5
