"""Config files that build on others: a top-level `base: [a.yaml, b.yaml]` names the files a config
starts from, the word sweep specs use for the same idea.

Why: recipes are composed (the LLaVA-1.5 base, a stage's overlay, a size's own file) so a value is
written once, yet a user runs one file: `python -m src.cli fit --config experiments/llava15_7b/
stage1_align.yaml` must be the whole recipe, not the part of it that file holds. A file's bases are
expanded into the files one would otherwise pass as several `--config` flags, in order (each base's
own bases first, then the base, then the file without its `base` key), so merging is exactly that
of repeated `--config`: later files override earlier ones key by key, and a list is replaced whole.

Every consumer expands the same way, through this module: the training CLI (`expand_config_args`,
before jsonargparse reads the flags), the SLURM launcher's parse of the same flags, and the sweep's
merge of its own `base:` files (`config_chain`, with omegaconf).

- Paths in `base:` are relative to the folder of the file that names them (absolute ones allowed, `~`
  expanded), so a recipe runs from any working directory.
- A file reached twice (two bases sharing a base) is merged once, at its first place: every file
  still comes after all the files it builds on, and a shared base does not undo what a file after
  its first use changed.
- A cycle, a missing base, or a `base:` that is not a list of paths stops with one line naming the
  file (`ConfigFileError`; the CLI prints it and exits with code 2).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

BASE_KEY = "base"
CONFIG_FLAGS = ("--config", "-c")  # jsonargparse's config flag, as LightningCLI names it
_BASE_LINE = re.compile(rf"^{BASE_KEY}\s*:")
_CONTINUATION = re.compile(r"^(\s|-(\s|$)|$)")  # indented, a block-sequence item at column 0, or blank


class ConfigFileError(ValueError):
    """A config's `base:` that cannot be followed; the message names the file and says why."""


@dataclass(frozen=True)
class ConfigPart:
    """One file of an expanded config: read from `path` as it is, or, for a file that had a `base:`
    key, its `text` without that key (the rest of the file unchanged, comments and all)."""

    path: Path
    text: str | None = None

    def argument(self) -> str:
        """The value for a `--config` flag: a path, or the config itself (jsonargparse takes either)."""
        return str(self.path) if self.text is None else self.text

    def load(self) -> DictConfig:
        """The part as omegaconf reads it (interpolations left unresolved)."""
        conf = OmegaConf.load(self.path) if self.text is None else OmegaConf.create(self.text)
        if not isinstance(conf, DictConfig):
            raise ConfigFileError(f"{shown(self.path)}: a config file is a mapping of keys to values")
        return conf


def shown(path: Path) -> str:
    """A path as messages show it: relative to the working directory when it is under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def base_entries(path: Path) -> list[str] | None:
    """The `base:` list of a config file; None for a file without one (or that is not YAML: whoever
    reads it next says what is wrong with it)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(data, dict) or BASE_KEY not in data:
        return None
    entries = data[BASE_KEY]
    if not isinstance(entries, list) or not all(isinstance(entry, str) and entry for entry in entries):
        raise ConfigFileError(
            f"{shown(path)}: `{BASE_KEY}` must be a list of config files (paths relative to this file's "
            f"folder), e.g. [../shared.yaml], got {entries!r}"
        )
    return entries


def config_chain(path: str | os.PathLike) -> list[ConfigPart]:
    """The files `path` stands for, in merge order: its bases (each expanded the same way), then `path`
    itself without its `base` key. A file without `base:` is one part, read as it is."""
    parts: list[ConfigPart] = []
    _expand(Path(os.path.expanduser(str(path))), parts, seen=set(), stack=[])
    return parts


def _expand(path: Path, parts: list[ConfigPart], seen: set[Path], stack: list[Path]) -> None:
    key = path.resolve()
    if key in stack:
        cycle = " -> ".join(shown(p) for p in [*stack[stack.index(key) :], key])
        raise ConfigFileError(f"{shown(key)}: `{BASE_KEY}` cycle: {cycle}")
    if key in seen:
        return
    entries = base_entries(path)
    if entries is None:
        seen.add(key)
        parts.append(ConfigPart(path))
        return
    stack.append(key)
    for entry in entries:
        base = Path(os.path.expanduser(entry))
        base = (base if base.is_absolute() else key.parent / base).resolve()
        if not base.is_file():
            raise ConfigFileError(
                f"{shown(key)}: `{BASE_KEY}` entry {entry!r} is not a file (looked for {base}; paths are "
                "relative to the folder of the file that names them)"
            )
        _expand(base, parts, seen, stack)
    stack.pop()
    seen.add(key)
    parts.append(ConfigPart(path, without_base(path)))


def without_base(path: Path) -> str:
    """The file's text with its top-level `base:` key (and that key's value lines) taken out, the rest
    as written. Checked: it must read as the file less that key; where the key is not written as its
    own block (a flow mapping `{base: ...}`), the rest is written out by omegaconf instead."""
    text = Path(path).read_text()
    rest = _omegaconf_dict(text)
    rest.pop(BASE_KEY, None)
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _BASE_LINE.match(line)]
    if len(starts) == 1:
        end = starts[0] + 1
        while end < len(lines) and _CONTINUATION.match(lines[end]):
            end += 1
        stripped = "".join(lines[: starts[0]] + lines[end:])
        if _omegaconf_dict(stripped) == rest:
            return stripped
    return OmegaConf.to_yaml(OmegaConf.create(rest))


def _omegaconf_dict(text: str) -> dict:
    conf = OmegaConf.create(text) if text.strip() else OmegaConf.create({})
    return OmegaConf.to_container(conf, resolve=False) if isinstance(conf, DictConfig) else {}


def load_merged(paths: Sequence[str | os.PathLike]) -> DictConfig:
    """The files merged in order as repeated `--config` merges them, each expanded by its `base:`."""
    confs = [part.load() for path in paths for part in config_chain(path)]
    merged = OmegaConf.merge(*confs) if confs else OmegaConf.create({})
    assert isinstance(merged, DictConfig)
    return merged


def expand_config_args(argv: Sequence[str]) -> list[str]:
    """Command-line arguments with each `--config F` (`--config=F`, `-c F`) whose file has a `base:`
    replaced by one `--config` per file of its chain: `--config a.yaml --config b.yaml --config <F's
    text without base>`. Other arguments, and configs without `base:` (or not files), pass unchanged."""
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        if flag == "--config" and eq:  # argparse reads `-c=F` as the value "=F": only the long flag
            i += 1
        elif arg in CONFIG_FLAGS and i + 1 < len(args):
            flag, value = arg, args[i + 1]
            i += 2
        else:
            out.append(arg)
            i += 1
            continue
        if not os.path.isfile(os.path.expanduser(value)) or base_entries(Path(os.path.expanduser(value))) is None:
            out += [flag, value]
            continue
        for part in config_chain(value):
            if part.text is None or _omegaconf_dict(part.text):  # a file that held only `base:` adds nothing
                out += [flag, part.argument()]
    return out
