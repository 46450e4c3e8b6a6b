"""lmms-eval's scoring code, loaded from the installed wheel at test time, as the reference.

`lmms-eval==0.7.3` is installed without its dependencies (`noxfile.py` does it for CI, with
pandas, which its MMBench evaluator needs). Its task modules import heavy packages at the top
(datasets, loguru, sacrebleu, the package's own registry): `lmms_modules` loads only the files
named, from the installed paths, with whatever of those is not importable stubbed in
`sys.modules` for the duration, and removes them and the lmms_eval modules after. Nothing is copied into src/.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

LMMS_EVAL = "0.7.3"


def _needed(reason: str) -> None:
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"{reason}; CI runs these tests against it", pytrace=False)
    pytest.skip(reason)


def lmms_root() -> Path:
    """The installed `lmms_eval` folder; skips with the reason when missing (fails under CI)."""
    try:
        version = importlib.metadata.version("lmms-eval")
    except importlib.metadata.PackageNotFoundError:
        version = None
    spec = importlib.util.find_spec("lmms_eval") if version else None  # finds it without importing it
    root = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    if version != LMMS_EVAL or root is None:
        found = f"found lmms-eval {version}" if version else "lmms-eval is not installed"
        _needed(f"lmms-eval's scorers are the reference: pip install --no-deps lmms-eval=={LMMS_EVAL} ({found})")
    return root


def _stub(name: str, **attributes: object) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so submodules can be registered under it
    for key, value in attributes.items():
        setattr(module, key, value)
    return module


class _Logger:
    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def _identity_decorator(*args, **kwargs):
    return lambda fn: fn


@contextlib.contextmanager
def lmms_modules(*files: str, needs: tuple[str, ...] = ()) -> Iterator[dict[str, types.ModuleType]]:
    """Loads the installed `lmms_eval/<file>`s (e.g. `tasks/pope/utils.py`) under their dotted
    names, in order; yields them by file. `needs`: real packages the code cannot work without
    (pandas): a missing one skips the test (fails under CI)."""
    root = lmms_root()
    for package in needs:
        if importlib.util.find_spec(package) is None:
            _needed(f"lmms-eval's reference code needs {package}: pip install {package}")
    saved = dict(sys.modules)
    try:
        for optional, attributes in (
            ("loguru", {"logger": _Logger()}),
            ("datasets", {"Dataset": object, "load_dataset": None}),
            ("sacrebleu", {}),
            ("requests", {}),
        ):
            if importlib.util.find_spec(optional) is None:
                sys.modules[optional] = _stub(optional, **attributes)
        registry = {"register_metric": _identity_decorator, "register_aggregation": lambda name: lambda fn: fn}
        sys.modules["lmms_eval"] = _stub("lmms_eval")
        sys.modules["lmms_eval.api"] = _stub("lmms_eval.api")
        sys.modules["lmms_eval.api.registry"] = _stub("lmms_eval.api.registry", **registry)
        loaded = {}
        for file in files:
            path = root / file
            parts = ["lmms_eval", *Path(file).with_suffix("").parts]
            for depth in range(2, len(parts)):
                sys.modules.setdefault(".".join(parts[:depth]), _stub(".".join(parts[:depth])))
            name = ".".join(parts)
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            loaded[file] = module
        yield loaded
    finally:
        # only lmms_eval's own modules and the stubs go: a real package the task code imported (datasets
        # registers pyarrow extension types once per process) must stay, or its next import fails
        stubbed = {name for name, module in sys.modules.items() if isinstance(module, types.ModuleType)
                   and getattr(module, "__spec__", None) is None and name not in saved}  # fmt: skip
        for name in set(sys.modules) - set(saved):
            if name == "lmms_eval" or name.startswith("lmms_eval.") or name in stubbed:
                del sys.modules[name]
        sys.modules.update(saved)
