"""The teacher's prompts, from one of two layouts, and the symbolic image it is shown.

1. The kit's own (the default, `src/instruct/prompts/<kind>.yaml`, or the same names in a
   folder of your own): `system` (the teacher's instructions), `use_boxes` (whether the object
   boxes are shown as well as the captions), `examples` (few-shot `context` / `response`
   pairs) and limits the parsed answer must meet (`min_turns`, `max_turns`, `min_chars`,
   `max_chars`). Example responses may be wrapped for reading: the lines of a paragraph are
   joined when loaded (`unwrap`).
2. LLaVA's (`playground/data/prompts` of haotian-liu/LLaVA, the prompts the paper's data was
   made with): one folder per kind (`conversation`, `detail_description`, `complex_reasoning`)
   holding `system_message.txt` and few-shot pairs `NNN_caps.txt` (the example's context) /
   `NNN_conv.txt` (its response), any number of them, in the order of their numbers. The
   files are sent as they are (read in text mode, nothing stripped or joined). Which kinds show
   boxes, and the limits a reply must meet, are the kit's for that kind.

`load_kind` finds the layout: `<folder>/<kind>.yaml`, else `<folder>/<LLaVA folder>/`.

The request is the paper's (its Tables 10-12): the system message, then each example as a user
turn (its context) and an assistant turn (its response), then the image's own context as the
last user turn. The context is the captions, one a line, in the input's order, then, when the
kind shows boxes, a blank line and one `category: [x1, y1, x2, y2]` a line: coordinates in 0-1
rounded to `decimals` places and printed as Python prints a float (`0.63`, `0.0`, `1.0`), as in
LLaVA's own `NNN_caps.txt` files.

The detail kind's human turn is a question drawn from a list in a file of its own
(`load_questions`; the kit's is `src/instruct/prompts/detail_questions.yaml`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from src.instruct.sources import Box, Item

log = logging.getLogger(__name__)

KINDS = ("conversation", "detail", "complex_reasoning")
PROMPTS_DIR = Path(__file__).parent / "prompts"
QUESTIONS_FILE = PROMPTS_DIR / "detail_questions.yaml"
LLAVA_FOLDERS = {
    "conversation": "conversation",
    "detail": "detail_description",
    "complex_reasoning": "complex_reasoning",
}
"""The kit's kind names -> the folder names of LLaVA's prompt layout."""
LLAVA_SYSTEM = "system_message.txt"
_LLAVA_EXAMPLE = re.compile(r"^(\d+)_(caps|conv)\.txt$")


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
    origin: str = ""
    """Where the prompt text came from (a YAML file or a LLaVA kind folder), for messages."""

    @property
    def single_answer(self) -> bool:
        """The reply is one answer (a description) to a question from the list, not Question/Answer blocks."""
        return self.kind == "detail"


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
    """The prompts of one kind: `<folder>/<kind>.yaml` (the package's own by default), or a
    folder in LLaVA's layout (`<folder>/detail_description/system_message.txt` ...).
    Errors name the files."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {list(KINDS)}")
    root = Path(folder or PROMPTS_DIR)
    path = root / f"{kind}.yaml"
    if path.is_file():
        return _load_yaml_kind(kind, path)
    llava = root / LLAVA_FOLDERS[kind]
    if (llava / LLAVA_SYSTEM).is_file():
        return load_llava_kind(kind, llava)
    if (root / LLAVA_SYSTEM).is_file():
        raise FileNotFoundError(
            f"{root} holds one kind's LLaVA prompts; set prompts to the folder above it "
            f"(the one with {sorted(set(LLAVA_FOLDERS.values()))})"
        )
    raise FileNotFoundError(f"no prompt file for kind {kind!r}: neither {path} nor {llava / LLAVA_SYSTEM}")


def _load_yaml_kind(kind: str, path: Path) -> KindSpec:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a valid prompt file (a mapping of settings is needed)")
    if "questions" in data:
        raise ValueError(
            f"{path}: `questions` is no longer read from the prompt file; put them in a file of their own "
            "and set detail_questions to it"
        )
    try:
        examples = tuple((str(e["context"]).strip(), unwrap(str(e["response"]))) for e in data.get("examples") or [])
        return KindSpec(
            kind=kind,
            system=str(data["system"]).strip(),
            use_boxes=bool(data.get("use_boxes", False)),
            examples=examples,
            min_turns=int(data.get("min_turns", 1)),
            max_turns=int(data.get("max_turns", 1)),
            min_chars=int(data.get("min_chars", 1)),
            max_chars=int(data.get("max_chars", 8000)),
            origin=str(path),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{path}: not a valid prompt file ({error!r})") from error


def load_llava_kind(kind: str, folder: Path | str) -> KindSpec:
    """One kind from a folder in LLaVA's layout: `system_message.txt` and `NNN_caps.txt` /
    `NNN_conv.txt` pairs, sent exactly as written. Boxes and reply limits are the kit's."""
    folder = Path(folder)
    system = (folder / LLAVA_SYSTEM).read_text(encoding="utf-8")
    if not system.strip():
        raise ValueError(f"{folder / LLAVA_SYSTEM} is empty")
    pairs: dict[int, dict[str, Path]] = {}
    for path in sorted(folder.iterdir()):
        match = _LLAVA_EXAMPLE.match(path.name)
        if match is None:
            if path.suffix == ".txt" and path.name != LLAVA_SYSTEM:
                log.warning("%s: not NNN_caps.txt / NNN_conv.txt, so not a few-shot example; left out", path)
            continue
        number, part = int(match.group(1)), match.group(2)
        if part in pairs.setdefault(number, {}):
            raise ValueError(f"{folder}: two {part} files numbered {number}: {pairs[number][part].name}, {path.name}")
        pairs[number][part] = path
    examples = []
    for number in sorted(pairs):
        pair = pairs[number]
        for part, other in (("caps", "conv"), ("conv", "caps")):
            if part not in pair:
                raise ValueError(
                    f"{pair[other]} has no partner {part} file (NNN_caps.txt and NNN_conv.txt go in pairs)"
                )
        examples.append((pair["caps"].read_text(encoding="utf-8"), pair["conv"].read_text(encoding="utf-8")))
    kit = _load_yaml_kind(kind, PROMPTS_DIR / f"{kind}.yaml")  # which kinds show boxes, and the reply limits
    return KindSpec(
        kind=kind,
        system=system,
        use_boxes=kit.use_boxes,
        examples=tuple(examples),
        min_turns=kit.min_turns,
        max_turns=kit.max_turns,
        min_chars=kit.min_chars,
        max_chars=kit.max_chars,
        origin=str(folder),
    )


def load_questions(path: Path | str | None = None) -> tuple[str, ...]:
    """The detail kind's questions: a YAML or JSON list of strings, or a text file with one
    question a line (blank lines ignored). The kit's own list by default."""
    path = Path(path or QUESTIONS_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"no question file {path} (detail_questions)")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        data = yaml.safe_load(text)  # JSON is YAML
        if not isinstance(data, list) or not all(isinstance(q, str) for q in data):
            raise ValueError(f"{path}: a list of question strings is needed")
        questions = [" ".join(q.split()) for q in data]
    else:
        questions = [line.strip() for line in text.splitlines()]
    questions = [q for q in questions if q]
    if not questions:
        raise ValueError(f"{path} holds no question")
    return tuple(questions)


def format_number(value: float, decimals: int = 3) -> str:
    """A coordinate as the paper's teacher saw it: rounded, then printed as Python prints a
    float (`0.63`, `0.222`, `0.0`, `1.0`; no padding zeros). Never in exponent form: Python
    writes 0.00005 as `5e-05`, which only more than 4 decimals can produce."""
    rounded = float(round(value, decimals))
    text = repr(rounded)
    if "e" in text:
        text = f"{rounded:.{decimals}f}".rstrip("0")
        text = text + "0" if text.endswith(".") else text
    return text


def format_box(box: Box, decimals: int = 3) -> str:
    """`category: [x1, y1, x2, y2]`, as in LLaVA's `NNN_caps.txt` files."""
    coords = ", ".join(format_number(v, decimals) for v in (box.x1, box.y1, box.x2, box.y2))
    return f"{box.category}: [{coords}]"


def render_context(item: Item, use_boxes: bool, decimals: int = 3) -> str:
    """The symbolic image: captions one a line, then (with boxes) a blank line and the boxes."""
    text = "\n".join(item.captions)
    if use_boxes and item.boxes:
        text += "\n\n" + "\n".join(format_box(box, decimals) for box in item.boxes)
    return text


def shown_numbers(spec: KindSpec, item: Item, decimals: int = 3) -> tuple[float, ...]:
    """The coordinates the teacher is shown for this item and kind (none when boxes are not
    shown): what a reply must not copy."""
    if not spec.use_boxes:
        return ()
    return tuple(round(v, decimals) for box in item.boxes for v in (box.x1, box.y1, box.x2, box.y2))


def build_messages(spec: KindSpec, item: Item, decimals: int = 3) -> list[dict[str, str]]:
    """The Chat Completions messages for one item and kind."""
    messages = [{"role": "system", "content": spec.system}]
    for context, response in spec.examples:
        messages.append({"role": "user", "content": context})
        messages.append({"role": "assistant", "content": response})
    messages.append({"role": "user", "content": render_context(item, spec.use_boxes, decimals)})
    return messages
