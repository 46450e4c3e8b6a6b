"""What the launch tools share in parsing their YAML with jsonargparse (the CLI's parser): its errors
made one line, so a bad spec or settings file reads like a bad training config."""

from __future__ import annotations

import argparse


def one_line(error: BaseException) -> str:
    """jsonargparse's message on one line: `Parser key "time": Expected a <class 'str'>. Got value: 86400`.
    The union's bookkeeping lines (`Subtypes:`, `Errors:`, the value's type) are left out."""
    lines = [line.strip().removeprefix("- ") for line in str(error).splitlines() if line.strip()]
    noise = ("Subtypes:", "Errors:", "Given value type:")
    kept = [line for line in lines if not line.startswith(noise)]
    return " ".join(kept) if kept else str(error)


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
