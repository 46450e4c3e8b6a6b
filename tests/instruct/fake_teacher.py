"""A scripted teacher for the generator's tests: valid replies that name the item they answer,
and rule-breaking ones on a schedule, behind the loopback ChatServer.

Items are made with captions "A photo of item <id> ..."; the teacher reads the id and the
kind (from the system message) of each request, so tests can count requests per item."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from src.instruct.prompts import KINDS, load_kind

SYSTEMS = {load_kind(kind).system: kind for kind in KINDS}
_ITEM = re.compile(r"item (\w+)")

_PAIR = "===\nQuestion:\nWhat colour is the ball?\n===\nAnswer:\nThe ball lying in the grass in front of the dog is bright red."
# rule-breaking replies for the conversation kind, each breaking exactly one rule
BAD_REPLIES = {
    "leaked_caption": f"Question:\nWhat does the caption say?\n===\nAnswer:\nThe caption says there is a dog.\n{_PAIR}",
    "leaked_coordinates": f"Question:\nWhere is the dog?\n===\nAnswer:\nThe dog is at [0.120, 0.400, 0.560, 0.900].\n{_PAIR}",
    "bad_format": "Sure! Here is a nice conversation about this picture for you.",
    "bad_alternation": f"Question:\nWhat is it?\n===\nQuestion:\nWhy is it there?\n===\nAnswer:\nA dog.\n{_PAIR}",
    "too_short": "Question:\nWhat?\n===\nAnswer:\nA dog.\n===\nQuestion:\nColour?\n===\nAnswer:\nBrown.",
    "image_tag": f"Question:\nWhat is in <image>?\n===\nAnswer:\nA small brown dog sits on the lawn.\n{_PAIR}",
}


def request_key(request: dict) -> tuple[str, str]:
    """(item id, kind) of a Chat Completions request the generator sent."""
    kind = SYSTEMS[request["messages"][0]["content"]]
    match = _ITEM.search(request["messages"][-1]["content"])
    return match.group(1), kind


def good_reply(item: str, kind: str) -> str:
    if kind == "detail":
        return (
            f"The picture shows item {item}: a small dog with brown fur sitting on a green lawn in bright "
            "daylight. Behind the dog a wooden fence runs along the garden, and a red ball lies in the grass "
            "in front of its paws, as if the two had just finished a game of fetch."
        )
    if kind == "complex_reasoning":
        return (
            f"Question:\nWhy might the dog in item {item} be waiting next to the ball?\n===\nAnswer:\n"
            "Dogs that have been playing fetch often bring the ball back and wait beside it, hoping the game "
            "goes on. Its relaxed posture and the ball right in front of it suggest exactly that."
        )
    return (
        f"Question:\nWhat animal is in item {item}?\n===\nAnswer:\nA small brown dog sits on the lawn.\n===\n"
        "Question:\nWhat is in front of it?\n===\nAnswer:\nA red ball lies in the grass in front of its paws."
    )


class Teacher:
    """`respond` for ChatServer. `bad(item, kind, n)` gives a BAD_REPLIES key for the n-th
    (0-based) request of that item and kind, or None for a good reply."""

    def __init__(self, bad: Callable[[str, str, int], str | None] | None = None) -> None:
        self.bad = bad
        self.counts: Counter[tuple[str, str]] = Counter()
        self.injected: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __call__(self, request: dict) -> str:
        key = request_key(request)
        with self.lock:
            n = self.counts[key]
            self.counts[key] += 1
            reason = self.bad(*key, n) if self.bad else None
            if reason:
                self.injected[reason] += 1
        return BAD_REPLIES[reason] if reason else good_reply(*key)


def make_records(folder: Path, n: int, jpeg: bytes, prefix: str = "") -> Path:
    """n records with one image each (the same small JPEG) and a records.json list."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        name = f"img{i:04d}.jpg"
        (images / name).write_bytes(jpeg)
        records.append(
            {
                "id": f"{prefix}{i}",
                "image": name,
                "captions": [f"A photo of item {prefix}{i} with a dog.", "A dog on a lawn with a red ball."],
                "boxes": [
                    {"category": "dog", "bbox": [8, 16, 40, 56]},
                    {"category": "sports ball", "bbox": [40, 48, 50, 60]},
                ],
            }
        )
    path = folder / "records.json"
    path.write_text(json.dumps(records))
    return path


def make_coco(folder: Path, n: int, jpeg: bytes) -> tuple[Path, Path]:
    """A COCO-style captions + instances pair for n 64x64 images (ids 100, 101 ...)."""
    images_dir = folder / "train2017"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, captions, boxes = [], [], []
    for i in range(n):
        image_id = 100 + i
        name = f"{image_id:012d}.jpg"
        (images_dir / name).write_bytes(jpeg)
        images.append({"id": image_id, "file_name": name, "width": 64, "height": 64})
        for text in (f"A photo of item {image_id} with a dog.", "A dog on a lawn."):
            captions.append({"id": len(captions), "image_id": image_id, "caption": text})
        boxes.append({"id": len(boxes), "image_id": image_id, "category_id": 18, "bbox": [8, 16, 32, 40]})
    categories = [{"id": 18, "name": "dog", "supercategory": "animal"}]
    (folder / "captions.json").write_text(json.dumps({"images": images, "annotations": captions}))
    (folder / "instances.json").write_text(
        json.dumps({"images": images, "annotations": boxes, "categories": categories})
    )
    return folder / "captions.json", folder / "instances.json"


# ------------------------------------------------------------------ a prompt folder in LLaVA's layout
# The test's own text (never LLaVA's): what matters is the layout and that the files are sent as
# written: trailing spaces, a final newline in one file and not in the others, examples numbered
# 9 and 10 (ordered by number, not by name), a file that is not an example (README.md).
LLAVA_FILES = {
    "conversation/system_message.txt": "TEST SYSTEM conversation: talk about the picture.\nAsk and answer.  ",
    "conversation/000_caps.txt": "Two goats on a hill.\nA goat eats grass.",
    "conversation/000_conv.txt": (
        "Question:\nHow many goats are there?\n===\nAnswer:\nThere are two goats. \n\nOne of them is eating."
    ),
    "conversation/001_caps.txt": "A red kite over a beach.",
    "conversation/001_conv.txt": "Question:\nWhat flies over the beach?\n===\nAnswer:\nA red kite.\n",
    "detail_description/system_message.txt": "TEST SYSTEM detail: describe the picture from the boxes.",
    "detail_description/000_caps.txt": "A cup on a desk.\n\ncup: [0.1, 0.2, 0.3, 0.4]",
    "detail_description/000_conv.txt": "A cup stands on the left of a desk.",
    "detail_description/001_caps.txt": "A lamp.\n\nlamp: [0.5, 0.0, 0.9, 1.0]",
    "detail_description/001_conv.txt": "A tall lamp fills the right half.",
    "detail_description/002_caps.txt": "A chair.\n\nchair: [0.0, 0.5, 0.25, 1.0]",
    "detail_description/002_conv.txt": "A chair sits in the lower left corner.",
    "detail_description/README.md": "not an example",
    "complex_reasoning/system_message.txt": "TEST SYSTEM complex: ask one hard question.\n",
    "complex_reasoning/10_caps.txt": "Snow on a roof.\n\nhouse: [0.2, 0.3, 0.8, 0.9]",
    "complex_reasoning/10_conv.txt": "Question:\nWhy is the roof steep?\n===\nAnswer:\nSo the snow slides off.",
    "complex_reasoning/9_caps.txt": "A wet road.\n\ncar: [0.1, 0.5, 0.4, 0.8]",
    "complex_reasoning/9_conv.txt": "Question:\nWhy drive slowly?\n===\nAnswer:\nWet roads are slippery.",
}
LLAVA_SYSTEMS = {
    LLAVA_FILES["conversation/system_message.txt"]: "conversation",
    LLAVA_FILES["detail_description/system_message.txt"]: "detail",
    LLAVA_FILES["complex_reasoning/system_message.txt"]: "complex_reasoning",
}


def write_llava_prompts(root: Path) -> Path:
    """LLAVA_FILES under root (bytes as written: newline translation is not part of the test)."""
    for name, text in LLAVA_FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
    return root
