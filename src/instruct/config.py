"""Settings of a generation run: a YAML file, command-line flags over it, saved with the outputs.

The YAML's keys are `GenerateConfig`'s fields, with the teacher's (`ChatConfig`'s) under
`teacher:`; jsonargparse (the training CLI's parser) makes every field a typed flag documented by
its docstring (`--max_attempts`, `--teacher.model`), and `--print_config` prints the settings a
command resolves to. The flags the tool took before still work (`--max-attempts`, `--model`,
`--kinds a b`, `--no-progress`). The API key is never a setting: `teacher.api_key_env` names the
environment variable that holds it, and that name is all the saved `config.yaml` holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser

from src.core.chat_client import ChatConfig
from src.core.cli_config import argparse_flags, new_parser, one_line, parse
from src.instruct.prompts import KINDS
from src.instruct.sampling import IMAGE_POSITIONS


@dataclass
class GenerateConfig:
    """What to read, what to ask the teacher for, and where to write it."""

    out: str | None = None
    """Folder for the ledger, the LLaVA JSON, the shards, the summary and the saved config."""
    coco_captions: str | None = None
    """Input 1: a COCO captions file (with coco_instances for boxes, and images)."""
    coco_instances: str | None = None
    records: str | None = None
    """Input 2: a JSON list or JSONL of {id?, image, captions|caption, boxes?} (with images)."""
    shards: list[str] | str | None = None
    """Input 3: caption shard paths or brace patterns (images travel inside)."""
    images: str | None = None
    """Folder the COCO file names / records' image paths are relative to."""
    boxes_normalized: bool = False
    """Input boxes are already 0-1 (else pixels, normalised by the image size)."""
    kinds: list[str] | str = field(default_factory=lambda: list(KINDS))
    """Response kinds to write for every image: one sample per image and kind (a list, or names
    separated by commas)."""
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
    kinds; as a flag: --kind_limits detail=23000 conversation=58000."""
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
    """Write WebDataset shards of the samples (and their images) beside the LLaVA JSON."""
    max_count: int = 10000
    """Samples per output shard at most."""
    max_size: float = 3e9
    """Bytes per output shard at most."""
    progress: bool = True
    """Show a progress bar."""
    teacher: ChatConfig = field(default_factory=ChatConfig)
    """The OpenAI-compatible server that writes the replies, and how hard to push it."""

    def __post_init__(self) -> None:
        if isinstance(self.teacher, dict):
            self.teacher = ChatConfig(**self.teacher)
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


def save_config(config: GenerateConfig, path: Path | str) -> None:
    """The settings as YAML, reloadable with --config; it holds the key's variable name only."""
    text = "# written by python -m src.instruct; rerun with --config this file\n"
    Path(path).write_text(text + yaml.safe_dump(config.to_dict(), sort_keys=False))


# ------------------------------------------------------------------ parsing


def build_parser(description: str | None = None) -> ArgumentParser:
    """`--config`, `--print_config`, the run's switches, and a typed flag per setting (the teacher's
    under `teacher.`)."""
    parser = new_parser("python -m src.instruct", description)
    parser.add_argument("--verbose", action="store_true", help="log every retry and rejected reply")
    parser.add_argument(
        "--dry_run", action="store_true", help="print the requests for the first image and stop: nothing is sent"
    )
    parser.add_class_arguments(GenerateConfig, nested_key=None)
    return parser


def parse_args(argv: Sequence[str], description: str | None = None) -> tuple[GenerateConfig, dict[str, bool]]:
    """The settings (YAML first, then the flags given on top, wherever `--config` stands) and the run's
    switches (verbose, dry_run). A bad key or value: one line on stderr, exit code 2."""
    parser = build_parser(description)
    flags = argparse_flags(_config_first(list(argv)), parser, groups=["teacher"])
    args = parse(parser, flags)
    switches = {name: bool(args.pop(name)) for name in ("verbose", "dry_run")}
    args.pop("config", None)
    try:
        settings = parser.instantiate(args).as_dict()
        return GenerateConfig(**settings), switches
    except (TypeError, ValueError) as error:
        raise ValueError(one_line(error)) from None


def load_config(path: Path | str) -> GenerateConfig:
    """A settings file as `--config` reads it (a saved config.yaml too)."""
    return parse_args(["--config", str(path)])[0]


def _config_first(argv: list[str]) -> list[str]:
    """`--config FILE` moved to the front, so flags override the file wherever they stand (as before)."""
    front, rest = [], []
    i = 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            front += argv[i : i + 2]
            i += 2
        elif argv[i].startswith("--config="):
            front.append(argv[i])
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    return front + rest
