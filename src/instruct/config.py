"""Settings of a generation run: a YAML file, command-line flags over it, saved with the outputs.

The YAML's keys are `GenerateConfig`'s fields, with the teacher's (`ChatConfig`'s) under
`teacher:`; every field is also a flag (`max_attempts` -> `--max-attempts`, `teacher.model`
-> `--model`). The API key is never a setting: `teacher.api_key_env` names the environment
variable that holds it, and that name is all the saved `config.yaml` holds.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from src.core.chat_client import ChatConfig
from src.instruct.prompts import KINDS
from src.instruct.sampling import IMAGE_POSITIONS


@dataclass
class GenerateConfig:
    out: str | None = None
    """Folder for the ledger, the LLaVA JSON, the shards, the summary and the saved config."""
    coco_captions: str | None = None
    """Input 1: a COCO captions file (with coco_instances for boxes, and images)."""
    coco_instances: str | None = None
    records: str | None = None
    """Input 2: a JSON list or JSONL of {id?, image, captions|caption, boxes?} (with images)."""
    shards: list[str] | None = None
    """Input 3: caption shard paths or brace patterns (images travel inside)."""
    images: str | None = None
    """Folder the COCO file names / records' image paths are relative to."""
    boxes_normalized: bool = False
    """Input boxes are already 0-1 (else pixels, normalised by the image size)."""
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    """Response kinds to write for every image: one sample per image and kind."""
    prompts: str | None = None
    """Prompt folder: <kind>.yaml files in the kit's format, or LLaVA's own layout (path/to/LLaVA/
    playground/data/prompts: conversation/, detail_description/, complex_reasoning/, each with
    system_message.txt and NNN_caps.txt / NNN_conv.txt pairs), sent as written. Default: the kit's."""
    detail_questions: str | None = None
    """File of the detail kind's questions (a YAML/JSON list, or one a line), one drawn per sample
    (default: the kit's list)."""
    seed: int = 0
    """Seeds each sample's draws (its detail question, its <image> place) with its id: a rerun or
    resume draws the same."""
    image_position: str = "front"
    """front: <image> opens the first question; random: before or after it, half and half
    (the paper's Eq. 2)."""
    decimals: int = 3
    """Box coordinates shown to the teacher are rounded to this many decimals (the paper: 3)."""
    limit: int | None = None
    """Use only the first N images of the input."""
    kind_limits: dict[str, int] | None = None
    """Per kind, only the first N images get that kind (e.g. detail=23000), to set the mix of
    kinds; as a flag: --kind-limits detail=23000 conversation=58000."""
    max_attempts: int = 3
    """Replies asked for one sample before giving it up when each is rejected."""
    retry_temperature: float = 0.7
    """A retry after a rejection is sent with at least this temperature, so a greedy teacher
    does not repeat the rejected reply."""
    length_growth: float = 2.0
    """A reply cut off at the token limit (finish_reason length) is never kept: it is asked again
    with the limit times this, up to max_tokens_cap, without using up one of max_attempts."""
    max_tokens_cap: int = 4096
    """The largest token limit a cut-off reply is retried with; cut off there too, it is a rejected
    attempt (truncated)."""
    prefix: str = "instruct"
    """Names: {prefix}.json(l), shards/{prefix}-000000.tar ..."""
    jsonl: bool = False
    """Write the LLaVA records as JSONL rather than one JSON list."""
    write_shards: bool = True
    max_count: int = 10000
    """Samples per output shard at most."""
    max_size: float = 3e9
    """Bytes per output shard at most."""
    progress: bool = True
    teacher: ChatConfig = field(default_factory=ChatConfig)

    def __post_init__(self) -> None:
        if isinstance(self.teacher, dict):
            self.teacher = ChatConfig(**_known(ChatConfig, self.teacher, "teacher"))
        if isinstance(self.shards, str):
            self.shards = [self.shards]
        if isinstance(self.kind_limits, list):  # from the flag: ["detail=23000", ...]
            self.kind_limits = dict(_key_count(text) for text in self.kind_limits)
        if isinstance(self.kinds, str):
            self.kinds = [k.strip() for k in self.kinds.split(",") if k.strip()]

    def check(self) -> None:
        """Raise ValueError naming what is missing or wrong, before any request is sent."""
        if not self.out:
            raise ValueError("no output folder: set out (--out)")
        inputs = [name for name in ("coco_captions", "records", "shards") if getattr(self, name)]
        if len(inputs) != 1:
            raise ValueError(f"give exactly one input: coco_captions, records or shards (got {inputs or 'none'})")
        if self.coco_instances and not self.coco_captions:
            raise ValueError("coco_instances needs coco_captions")
        if inputs[0] != "shards" and not self.images:
            raise ValueError(f"{inputs[0]} needs images, the folder its image paths are relative to")
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds or len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"kinds must be distinct names from {list(KINDS)}, got {self.kinds}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.image_position not in IMAGE_POSITIONS:
            raise ValueError(f"image_position must be one of {list(IMAGE_POSITIONS)}, got {self.image_position!r}")
        if self.length_growth <= 1:
            raise ValueError(f"length_growth must be above 1, got {self.length_growth}")
        if self.teacher.max_tokens is not None and self.max_tokens_cap < self.teacher.max_tokens:
            raise ValueError(
                f"max_tokens_cap ({self.max_tokens_cap}) is below the teacher's max_tokens ({self.teacher.max_tokens})"
            )
        if not 0 <= self.decimals <= 6:
            raise ValueError(f"decimals must be 0 to 6, got {self.decimals}")
        if self.kind_limits and (set(self.kind_limits) - set(self.kinds) or min(self.kind_limits.values()) < 0):
            raise ValueError(f"kind_limits must map configured kinds to counts >= 0, got {self.kind_limits}")
        if self.max_count < 1 or self.max_size < 1:
            raise ValueError("max_count and max_size must be positive")

    def kinds_for(self, index: int) -> list[str]:
        """The kinds the image at input position `index` gets."""
        limits = self.kind_limits or {}
        return [kind for kind in self.kinds if limits.get(kind) is None or index < limits[kind]]

    def total_jobs(self, images: int | None) -> int | None:
        """Samples wanted from an input of `images` images (None when unknown)."""
        if images is None:
            return None
        images = min(images, self.limit) if self.limit is not None else images
        limits = self.kind_limits or {}
        return sum(min(images, limits.get(kind) if limits.get(kind) is not None else images) for kind in self.kinds)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _key_count(text: str) -> tuple[str, int]:
    key, sep, value = text.partition("=")
    try:
        return key.strip(), int(value)
    except ValueError:
        raise ValueError(f"expected kind=count, got {text!r}") from None


def _known(cls: type, data: dict, where: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {where} settings {unknown}; valid ones: {sorted(names)}")
    return data


def load_yaml(path: Path | str) -> dict:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of settings")
    return data


def save_config(config: GenerateConfig, path: Path | str) -> None:
    """The settings as YAML, reloadable with --config; it holds the key's variable name only."""
    text = "# written by python -m src.instruct; rerun with --config this file\n"
    Path(path).write_text(text + yaml.safe_dump(config.to_dict(), sort_keys=False))


# ------------------------------------------------------------------ flags from the dataclasses


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base(tp: Any) -> Any:
    """bool / int / float / str / list from a field's type (Optional unwrapped)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        return _base(args[0])
    return list if typing.get_origin(tp) in (list, dict) else tp


def field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under a dataclass's fields (the litgpt style), by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def add_arguments(parser: argparse.ArgumentParser, cls: type, group: str | None = None) -> None:
    """One flag per field, defaulting to SUPPRESS so only flags given override the YAML."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    target = parser.add_argument_group(group) if group else parser
    for f in dataclasses.fields(cls):
        base = _base(hints[f.name])
        if base not in (bool, int, float, str, list):
            continue  # nested (teacher): its own group
        options: dict[str, Any] = {"dest": f"{group + '.' if group else ''}{f.name}", "default": argparse.SUPPRESS}
        if base is not bool:
            options["metavar"] = f.name.upper()
        if base is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif base is list:
            options["nargs"] = "+"
        else:
            options["type"] = _none_or(base)
        help_text = (docs.get(f.name, "") + f" (default: {_default(f)})").strip().replace("%", "%%")
        target.add_argument(_flag(f.name), help=help_text, **options)


def _none_or(base: type):
    def convert(text: str):
        return None if text.lower() in ("none", "null", "") else base(text)

    convert.__name__ = base.__name__
    return convert


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def build_config(args: argparse.Namespace) -> GenerateConfig:
    """YAML (`args.config`) first, then the flags given on top."""
    data = load_yaml(args.config) if getattr(args, "config", None) else {}
    _known(GenerateConfig, data, "top-level")
    teacher = dict(data.pop("teacher", None) or {})
    for key, value in vars(args).items():
        if key == "config":
            continue
        if key.startswith("teacher."):
            teacher[key.split(".", 1)[1]] = value
        else:
            data[key] = value
    return GenerateConfig(**data, teacher=ChatConfig(**_known(ChatConfig, teacher, "teacher")))
