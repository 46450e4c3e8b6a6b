"""Typed checks of every record the kit reads, shared by the shard writer, the inspector and the stream.

A record comes from a web-scale dump written by other tools: any JSON at all may arrive where a
LLaVA record is expected. Each check here turns one kind of fault into one `SampleError` reason
(`REASONS` lists them all, and docs/data.md mirrors that table), so the writer refuses exactly
what the stream would skip, under the same name, and nothing past start-up raises anything else.

Files that describe a whole shard set (`sizes.json`) are not samples: a fault there stops
start-up with an error naming the file (`read_sizes_table`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from src.data.conversation import IMAGE_TAG, OPTION_LETTERS, SampleError, to_turns

MAX_DEPTH = 32
"""Deepest JSON nesting a record may have (a LLaVA record has 3 levels, a record with boxes 5).
Far below Python's recursion limit, so a record that passes is safe to dump, print and parse
again anywhere; deeper ones are skipped as `too_deep` before anything walks them."""

# every reason a sample (or an input record) is skipped under, and what it means
REASONS: dict[str, str] = {
    "bad_json": "JSON (a shard's `json` member, a JSONL line) that does not parse",
    "too_deep": f"JSON nested deeper than {MAX_DEPTH} levels (a few KB can exhaust Python's recursion limit)",
    "not_an_object": "a record (or a `json` member) that is not a JSON object",
    "bad_text": "text that is not Unicode: a `txt` member that is not UTF-8, a JSON string with an unpaired "
    "surrogate (`\\ud800`)",
    "missing_field": "the field the view reads is absent or empty: `conversations`, `caption` or `mc`",
    "bad_conversation": "`conversations` is not a list of message objects, or its turns do not alternate human / gpt",
    "empty_conversation": "no messages, no complete turn, or a reply without text",
    "bad_caption": "`caption` is not a string",
    "bad_mc": "`mc` is not a list of question records `{question: str, options: [2-8 str], answer: int}`, "
    "or an answer is not one of the options",
    "image_tag_mismatch": "the number of `<image>` tags differs from the number of images",
    "bad_image_path": "an image path that is not a string, is absolute or leaves the image folder (`..`), "
    "or both `image` and `images` given",
    "missing_image": "an image file that does not exist; a sample holding fewer decodable images than its record "
    "declares (`image`/`images`, or `<image>` tags); a caption sample without an image",
    "bad_image": "image bytes that cannot be read or do not decode (truncated, corrupt)",
    "bad_image_format": "an image whose real format (read from its bytes, never its name) is not an allowed one",
    "too_many_pixels": "an image whose header claims more pixels than the budget (a decompression bomb)",
    "too_long": "the first turn alone exceeds max_length, or truncation would drop an image",
    "bad_shard": "a shard that cannot be opened or read to its end (cut, corrupt, vanished)",
    "missing_in_shard": "samples sizes.json counts for a shard that the shard no longer holds",
}


# ---------------------------------------------------------------- JSON


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how JSON text spells a UTF-16 surrogate


def _fault(value: Any, limit: int) -> SampleError | None:
    """The first structural fault of a parsed JSON value: nested deeper than `limit` containers, or
    a string (or key) with an unpaired surrogate, which no UTF-8 tokenizer or writer accepts.
    Iterative, so no depth can overflow it."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not _is_text(item):
                return SampleError("bad_text", "a JSON string holds an unpaired surrogate (not Unicode text)")
            continue
        if depth > limit:
            return SampleError("too_deep", f"the JSON is nested deeper than {limit} levels")
        if isinstance(item, dict):
            stack.extend((k, depth) for k in item)
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, (dict, list, str)))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, (dict, list, str)))
    return None


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_structure(value: Any, text: bytes | str | None = None) -> None:
    """Raises `too_deep` for a structure nested deeper than MAX_DEPTH and `bad_text` for a string
    that is not Unicode text. With the JSON `text` it came from, a text with no more brackets than
    MAX_DEPTH and no surrogate escape passes without a walk (the common case)."""
    if text is not None:
        try:  # json reads UTF-16 and UTF-32 too, and lets encoded surrogates through: those get the walk
            chars = text.decode("utf-8") if isinstance(text, bytes) else text
        except UnicodeDecodeError:
            chars = None
        if chars is not None and chars.count("[") + chars.count("{") <= MAX_DEPTH:
            if not _SURROGATE_ESCAPE.search(chars) and _is_text(chars):
                return
    if (fault := _fault(value, MAX_DEPTH)) is not None:
        raise fault


def parse_json(text: bytes | str) -> Any:
    """JSON text as a value no deeper than MAX_DEPTH holding only Unicode text; `bad_json`,
    `too_deep` or `bad_text` otherwise."""
    try:
        value = json.loads(text)
    except RecursionError as error:
        raise SampleError("too_deep", "the JSON is nested deeper than Python's parser allows") from error
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, an integer of 5,000 digits
        raise SampleError("bad_json", f"JSON does not parse ({error})") from error
    check_structure(value, text)
    return value


def parse_object(text: bytes | str) -> dict:
    """A JSON object (a shard's `json` member, a JSONL record)."""
    value = parse_json(text)
    if not isinstance(value, dict):
        raise SampleError("not_an_object", f"a record must be a JSON object, got {type(value).__name__}")
    return value


def as_object(value: Any) -> dict:
    """An already parsed record (an item of a JSON list) checked as `parse_object` checks text."""
    if isinstance(value, SampleError):  # a JSONL line that did not parse
        raise value
    if not isinstance(value, dict):
        raise SampleError("not_an_object", f"a record must be a JSON object, got {type(value).__name__}")
    check_structure(value)
    return value


# ---------------------------------------------------------------- fields of a record


def conversation(record: dict) -> Any:
    """The `conversations` value, present and not null (its turns are checked by `to_turns`)."""
    value = record.get("conversations")
    if value is None:
        raise SampleError("missing_field", "no 'conversations' in the sample")
    if not isinstance(value, list):
        raise SampleError("bad_conversation", f"'conversations' must be a list, got {type(value).__name__}")
    return value


def caption(record: dict) -> str:
    value = record.get("caption")
    if value is not None and not isinstance(value, str):
        raise SampleError("bad_caption", f"'caption' must be a string, got {type(value).__name__}")
    if not value or not value.strip():
        raise SampleError("missing_field", "no caption in the sample")
    return value


@dataclass(frozen=True)
class Question:
    """One multiple-choice item of a record's `mc` list."""

    question: str
    options: tuple[str, ...]
    answer: int
    type: str | tuple[str, ...] = "all"  # a question type, or the groups it counts in (ScienceQA's table)


def _question(item: Any, number: int) -> Question:
    where = f"question {number}"
    if not isinstance(item, dict):
        raise SampleError("bad_mc", f"{where} must be an object, got {type(item).__name__}")
    missing = [k for k in ("question", "options", "answer") if k not in item]
    if missing:
        raise SampleError("bad_mc", f"{where} lacks {', '.join(missing)}")
    question, options, answer = item["question"], item["options"], item["answer"]
    if not isinstance(question, str):
        raise SampleError("bad_mc", f"{where}: the question must be a string, got {type(question).__name__}")
    if not isinstance(options, list):
        raise SampleError("bad_mc", f"{where}: options must be a list of strings, got {type(options).__name__}")
    if not all(isinstance(o, str) for o in options):
        raise SampleError("bad_mc", f"{where}: every option must be a string")
    if not 2 <= len(options) <= len(OPTION_LETTERS):
        raise SampleError("bad_mc", f"{where}: {len(options)} options; a question needs 2 to {len(OPTION_LETTERS)}")
    if not isinstance(answer, int) or isinstance(answer, bool):  # true is no option index
        raise SampleError("bad_mc", f"{where}: the answer must be an option index, got {type(answer).__name__}")
    if not 0 <= answer < len(options):
        raise SampleError("bad_mc", f"{where}: answer {answer} is not one of {len(options)} options")
    kind = item.get("type", "all")
    if isinstance(kind, list) and all(isinstance(k, str) for k in kind):
        kind = tuple(kind)
    elif not isinstance(kind, str):
        raise SampleError("bad_mc", f"{where}: type must be a string or a list of strings")
    return Question(question, tuple(options), answer, kind)


def questions(record: dict) -> list[Question]:
    """The record's multiple-choice items; none at all is `missing_field`, a malformed one `bad_mc`."""
    value = record.get("mc")
    if value is None or value == []:
        raise SampleError("missing_field", "no multiple-choice questions in the sample")
    if not isinstance(value, list):
        raise SampleError("bad_mc", f"'mc' must be a list of question records, got {type(value).__name__}")
    return [_question(item, number) for number, item in enumerate(value)]


def _tags(record: dict) -> int:
    """`<image>` tags in the turns the encoder will read (a dropped trailing question has none)."""
    messages = record.get("conversations")
    if not isinstance(messages, list):
        return 0
    try:
        turns = to_turns(messages)
    except SampleError:
        return 0
    return sum(h.count(IMAGE_TAG) + g.count(IMAGE_TAG) for h, g in turns)


def check_images(record: dict, found: int, needs_image: bool) -> None:
    """`missing_image` when the sample holds no decodable image where one is due: fewer images than
    the record's `image`/`images` paths (the writer keeps them as provenance), none at all though its
    conversation has `<image>` tags, or none for a view that needs one (a caption of nothing would
    train the model to describe nothing). Without this a multiple-choice or caption sample that lost
    its image would be read as a text-only one. Some images but not as many as tags is the encoder's
    `image_tag_mismatch`: the text, not a file, may be what is wrong."""
    paths = record.get("image", record.get("images"))
    declared = 1 if isinstance(paths, str) else len(paths) if isinstance(paths, list) else None
    if declared is not None and found < declared:
        raise SampleError("missing_image", f"the record names {declared} images; the sample holds {found}")
    if found:
        return
    if needs_image:
        raise SampleError("missing_image", "the sample holds no image; the view needs one")
    if declared is None and (tags := _tags(record)):
        raise SampleError("missing_image", f"the sample holds no image; its conversation has {tags} <image> tags")


def image_paths(record: dict) -> list[str]:
    """The record's image paths in `<image>` order: `image` (a path or a list) or `images`; each
    must stay inside the image folder (no absolute path, no `..`)."""
    if "image" in record and "images" in record:
        raise SampleError("bad_image_path", "the record has both 'image' and 'images'")
    value = record.get("image", record.get("images"))
    if value is None:
        return []
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise SampleError("bad_image_path", "image paths must be non-empty strings")
    for p in paths:
        if PurePath(p).is_absolute() or ".." in PurePath(p).parts:
            raise SampleError("bad_image_path", f"{p[:200]!r} is not a path inside the image folder")
    return paths


def check_fields(record: dict) -> None:
    """Checks the fields a record carries (`conversations`, `caption`, `mc`) whether or not a view
    reads them now: the writer and the inspector hold a sample to every view it may be read with."""
    if record.get("conversations") is not None:
        to_turns(conversation(record))
    if record.get("caption") is not None:
        caption(record)
    if record.get("mc") not in (None, []):
        questions(record)


@dataclass(frozen=True)
class LlavaRecord:
    """A LLaVA-format input record the writer turns into a sample: the record as read (written
    unchanged), its (human, gpt) turns and its image paths, one per `<image>` tag."""

    record: dict
    turns: list[tuple[str, str]]
    image_paths: list[str]


def llava_record(value: Any) -> LlavaRecord:
    """A LLaVA JSON / JSONL record checked as the stream will read it; cheap checks only (no file
    is touched), so a bad record costs no image reads."""
    record = as_object(value)
    turns = to_turns(conversation(record))  # missing_field / bad_conversation / empty_conversation
    if record.get("caption") is not None:
        caption(record)
    if record.get("mc") not in (None, []):
        questions(record)
    paths = image_paths(record)
    tags = sum(h.count(IMAGE_TAG) + g.count(IMAGE_TAG) for h, g in turns)
    if tags != len(paths):
        raise SampleError("image_tag_mismatch", f"{tags} {IMAGE_TAG} tags but {len(paths)} images")
    return LlavaRecord(record, turns, paths)


# ---------------------------------------------------------------- shard-set files


def read_sizes_table(path: Path) -> dict[str, int]:
    """A `sizes.json` (shard file name -> samples): ValueError naming the file for anything else,
    since a wrong count would silently mis-size every epoch."""
    try:
        table = json.loads(path.read_bytes())
    except RecursionError as error:
        raise ValueError(f"{path} is nested too deeply to be a sizes.json") from error
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); rewrite or delete it") from error
    except OSError as error:
        raise ValueError(f"{path} cannot be read ({error})") from error
    if not isinstance(table, dict):
        raise ValueError(f"{path} must map shard names to sample counts, got a {type(table).__name__}")
    for name, count in table.items():
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            got = count if isinstance(count, (int, float)) else type(count).__name__
            raise ValueError(f"{path}: the count of {name!r} must be a whole number >= 0, got {got}")
    return table
