"""What the side tools share in parsing their settings with jsonargparse, the parser the training CLI
uses: a dataclass's fields (their docstrings the help) become typed flags and YAML keys, `--config`
and `--print_config` come with them, and a bad key or value stops the tool with one line and exit
code 2, the way a bad training config does.

`python -m src.instruct` and `python -m src.eval.judge` parse with it; `one_line` is also the launch
tools' (sweep specs, SLURM settings, through src/launch/parsing.py).
"""

from __future__ import annotations

import json
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from jsonargparse import ArgumentParser, Namespace, set_parsing_settings

T = TypeVar("T")

set_parsing_settings(docstring_parse_attribute_docstrings=True)  # a field's docstring is its flag's help
NONE_WORDS = ("none", "null", "")  # what the tools' argparse flags took for None


def one_line(error: BaseException) -> str:
    """jsonargparse's message on one line: `Parser key "max_attempts": Expected a <class 'int'>. Got value: x`.
    The union's bookkeeping lines (`Subtypes:`, `Errors:`, the value's type) are left out."""
    lines = [line.strip().removeprefix("- ") for line in str(error).splitlines() if line.strip()]
    noise = ("Subtypes:", "Errors:", "Given value type:")
    kept = [line for line in lines if not line.startswith(noise)]
    return " ".join(kept) if kept else str(error)


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def new_parser(prog: str, description: str | None = None, parser_mode: str = "yaml") -> ArgumentParser:
    """A parser that raises on a bad argument (so `parse` can say it in one line) and takes `--config`."""
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False, parser_mode=parser_mode)
    parser.add_argument("--config", action="config", help="YAML file of settings; flags given after it override it")
    return parser


def parse(parser: ArgumentParser, argv: Sequence[str]) -> Namespace:
    """`parser.parse_args`, with an unknown key or a wrong type as one line on stderr and exit code 2."""
    try:
        return parser.parse_args(list(argv))
    except Exception as error:  # jsonargparse's ArgumentError, or a loader's error for a bad YAML file
        fail(one_line(error))


def load_dataclass(cls: type[T], path: Path | str, section: str | None = None) -> T:
    """A dataclass from a YAML file of its fields (omegaconf interpolation resolved), checked as the flags
    are: typed, an unknown key an error naming it. With `section`, a file that has that key holds the
    fields under it."""
    key = section if section and _has_key(path, section) else None
    parser = ArgumentParser(exit_on_error=False, parser_mode="omegaconf")
    parser.add_class_arguments(cls, nested_key=key)
    try:
        config = parser.instantiate(parser.parse_path(str(path)))
    except Exception as error:  # jsonargparse's ArgumentError, or the loader's for a bad YAML file
        raise ValueError(f"{path}: {one_line(error)}") from None
    if key:
        return config[key]
    return cls(**{name: config[name] for name in config.keys(branches=True, nested=False) if name != "__path__"})


def _has_key(path: Path | str, key: str) -> bool:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError:
        return False  # the parser says what is wrong with it
    return isinstance(data, dict) and key in data


# ------------------------------------------------------------------ the flags the tools took before


def argparse_flags(argv: Sequence[str], parser: ArgumentParser, groups: Sequence[str] = ()) -> list[str]:
    """The flags the tools' argparse parsers took, as jsonargparse's: `--max-attempts 3` -> `--max_attempts 3`;
    a field of a nested group by its own name (`--model m` -> `--teacher.model m`, with `groups=["teacher"]`);
    `--no-progress` -> `--progress false`; several values after a list flag (`--kinds a b`) -> one list, and
    after a dict flag (`--kind-limits detail=5`) -> one mapping; `none` -> null. What jsonargparse takes as
    it is (`--kinds [a,b]`, `--teacher.model m`, `--config`) passes unchanged."""
    options = parser._option_string_actions
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--"):
            out.append(arg)
            continue
        flag, eq, value = arg.partition("=")
        name = flag[2:].replace("-", "_")
        negated = name.startswith("no_") and _option(options, name[3:], groups)
        option = _option(options, name, groups) if not negated else negated
        if option is None or option in ("--config", "--print_config"):
            out.append(arg)  # jsonargparse's own, or unknown: jsonargparse names it
            continue
        if negated:
            out += [option, "false"]
            continue
        kind = _kind(options[option])
        if options[option].nargs == 0:  # a switch (--verbose): takes no value
            out.append(option)
            continue
        if eq:
            values = [value]
        else:
            values = []
            while i < len(args) and not args[i].startswith("--") and (kind is not None or not values):
                values.append(args[i])
                i += 1
        if kind is list and values and not values[0].startswith("["):
            out += [option, json.dumps(values)]
        elif kind is dict and values and not values[0].startswith("{"):
            out += [option, json.dumps(dict(_key_value(v) for v in values))]
        else:
            out += [option, *("null" if _is_none(v) else v for v in values)]
    return out


def _is_none(value: str) -> bool:
    return value.lower() in NONE_WORDS


def _option(options: dict, name: str, groups: Sequence[str]) -> str | None:
    for candidate in (f"--{name}", *(f"--{group}.{name}" for group in groups)):
        if candidate in options:
            return candidate
    return None


def _kind(action: Any) -> type | None:
    """list or dict for a flag typed as one (Optional unwrapped), else None."""
    hint = getattr(action, "_typehint", None)
    for candidate in (hint, *typing.get_args(hint)):
        origin = typing.get_origin(candidate)
        if origin in (list, dict):
            return origin
    return None


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        fail(f"expected key=value, got {text!r}")
    try:
        return key.strip(), int(value)
    except ValueError:
        return key.strip(), value
