"""The teacher's prompts: one data file per response kind, and the symbolic image it is shown.

Each kind is a YAML file (`src/instruct/prompts/<kind>.yaml`, or the same name in a folder of
your own): `system` (the teacher's instructions), `use_boxes` (whether the object boxes are
shown, as well as the captions), `examples` (few-shot `context` / `response` pairs), limits
the parsed answer must meet (`min_turns`, `max_turns`, `min_chars`, `max_chars`), and for
`detail` the `questions` a sample's human turn is drawn from. Example responses may be wrapped
for reading: the lines of a paragraph are joined when loaded (`unwrap`).

The request is the paper's: the system message, then each example as a user turn (its
context) and an assistant turn (its response), then the image's own context as the last
user turn. The context is the captions, one a line, then, when the kind shows boxes, a blank
line and one `category: [x1, y1, x2, y2]` a line, in 0-1 with `decimals` fixed decimals.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import yaml

from src.instruct.sources import Box, Item

KINDS = ("conversation", "detail", "complex_reasoning")
PROMPTS_DIR = Path(__file__).parent / "prompts"


@dataclass(frozen=True)
class KindSpec:
    kind: str
    system: str
    use_boxes: bool
    examples: tuple[tuple[str, str], ...]
    min_turns: int
    max_turns: int
    min_chars: int
    max_chars: int
    questions: tuple[str, ...] = ()
    """Only `detail`: the human turn is one of these, the teacher's reply its answer."""

    @property
    def single_answer(self) -> bool:
        """The reply is one answer (a description), not Question/Answer blocks."""
        return bool(self.questions)


_STRUCTURE = re.compile(r"^(?:question|answer)\s*:\s*$|^===+$", re.IGNORECASE)


def unwrap(text: str) -> str:
    """Join the lines of each paragraph (prompt files wrap them for reading; a teacher shown
    wrapped examples writes wrapped answers). Blank lines, `Question:`/`Answer:` labels and
    `===` separators stay on lines of their own."""
    lines: list[str] = []
    for line in text.strip().splitlines():
        line = line.strip()
        if lines and line and lines[-1] and not _STRUCTURE.match(line) and not _STRUCTURE.match(lines[-1]):
            lines[-1] += " " + line
        else:
            lines.append(line)
    return "\n".join(lines)


def load_kind(kind: str, folder: Path | str | None = None) -> KindSpec:
    """Read `<folder>/<kind>.yaml` (the package's own prompts by default); errors name the file."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {list(KINDS)}")
    path = Path(folder or PROMPTS_DIR) / f"{kind}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no prompt file {path} for kind {kind!r}")
    data = yaml.safe_load(path.read_text())
    try:
        examples = tuple((str(e["context"]).strip(), unwrap(str(e["response"]))) for e in data.get("examples") or [])
        spec = KindSpec(
            kind=kind,
            system=str(data["system"]).strip(),
            use_boxes=bool(data.get("use_boxes", False)),
            examples=examples,
            min_turns=int(data.get("min_turns", 1)),
            max_turns=int(data.get("max_turns", 1)),
            min_chars=int(data.get("min_chars", 1)),
            max_chars=int(data.get("max_chars", 8000)),
            questions=tuple(str(q).strip() for q in data.get("questions") or []),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{path}: not a valid prompt file ({error!r})") from error
    if spec.kind == "detail" and not spec.questions:
        raise ValueError(f"{path}: the detail kind needs a list of questions")
    return spec


def format_box(box: Box, decimals: int = 3) -> str:
    """`category: [x1, y1, x2, y2]` with fixed decimals, as the paper shows boxes."""
    coords = ", ".join(f"{v:.{decimals}f}" for v in (box.x1, box.y1, box.x2, box.y2))
    return f"{box.category}: [{coords}]"


def render_context(item: Item, use_boxes: bool, decimals: int = 3) -> str:
    """The symbolic image: captions one a line, then (with boxes) a blank line and the boxes."""
    text = "\n".join(item.captions)
    if use_boxes and item.boxes:
        text += "\n\n" + "\n".join(format_box(box, decimals) for box in item.boxes)
    return text


def build_messages(spec: KindSpec, item: Item, decimals: int = 3) -> list[dict[str, str]]:
    """The Chat Completions messages for one item and kind."""
    messages = [{"role": "system", "content": spec.system}]
    for context, response in spec.examples:
        messages.append({"role": "user", "content": context})
        messages.append({"role": "assistant", "content": response})
    messages.append({"role": "user", "content": render_context(item, spec.use_boxes, decimals)})
    return messages


def pick_question(spec: KindSpec, item_id: str) -> str:
    """The detail question for an item: the same one every run (a resumed run agrees)."""
    return spec.questions[zlib.crc32(item_id.encode("utf-8")) % len(spec.questions)]
