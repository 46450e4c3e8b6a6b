"""What the launch tools share in parsing their YAML with jsonargparse (the CLI's parser): its errors
made one line (`one_line`, the one in src/core/cli_config.py that the instruct and judge tools use), so a
bad spec or settings file reads like a bad training config; and the dashed flags the tools took before."""

from __future__ import annotations

import argparse

from src.core.cli_config import one_line

__all__ = ["dashed_flags", "one_line"]


def dashed_flags(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`--cpus-per-task 6` -> `--cpus_per_task 6` where the parser knows the underscore form: the
    fields' own names are the flags jsonargparse makes, the dashed ones are what the tools took before."""
    known = set(parser._option_string_actions)
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if flag.startswith("--") and "-" in flag[2:] and flag not in known:
            underscored = "--" + flag[2:].replace("-", "_")
            if underscored in known:
                arg = underscored + eq + value
        out.append(arg)
    return out
