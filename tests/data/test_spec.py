"""src.data.spec: the DataSpec contract, and the data layer knowing the model only through it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from src.data.spec import DataSpec, DataSpecSource

DATA = Path(__file__).resolve().parents[2] / "src" / "data"
ABOVE_DATA = ("src.model", "src.training", "src.eval", "src.launch", "src.instruct", "src.cli", "src.export")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, also inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_data_layer_imports_nothing_above_it():
    files = sorted(DATA.rglob("*.py"))
    assert len(files) > 10
    upward = {
        f"{path.relative_to(DATA)} -> {name}"
        for path in files
        for name in imported_modules(path)
        if name.startswith(ABOVE_DATA)
    }
    assert upward == set()


def test_a_spec_from_a_mapping_and_dict_style_access(tokenizer, image_transform):
    fields = {"tokenizer": tokenizer, "image_transform": image_transform, "image_tokens": 16}
    spec = DataSpec.of(fields)
    assert spec == DataSpec(tokenizer, image_transform, 16) and DataSpec.of(spec) is spec
    assert spec["image_tokens"] == 16 and spec["image_token_count"] is None
    with pytest.raises(KeyError):
        spec["pad_id"]
    with pytest.raises(TypeError, match=r"unknown DataSpec fields \['image_size'\]"):
        DataSpec.of(fields | {"image_size": 64})
    with pytest.raises(TypeError, match="expected a DataSpec or a mapping of its fields, got int"):
        DataSpec.of(3)


def test_pad_id_is_the_pad_token_else_end_of_sequence(tokenizer, image_transform):
    spec = DataSpec(tokenizer, image_transform, 16)
    assert tokenizer.pad_token_id is not None and spec.pad_id == tokenizer.pad_token_id

    class NoPad:
        pad_token_id, eos_token_id = None, 2

    assert DataSpec(NoPad(), image_transform, 16).pad_id == 2


def test_the_lightning_module_is_a_source(demo_dir):
    from src.training.module import LlavaLitModule  # the test may look up; the data layer may not

    module = LlavaLitModule(str(demo_dir / "tokenizer"))
    assert isinstance(module, DataSpecSource)
    assert not isinstance(object(), DataSpecSource)
