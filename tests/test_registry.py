"""src.registry: exact-name lookup, helpful errors, no silent re-registration."""

from __future__ import annotations

import re

import pytest

from src.data.conversation import TEMPLATES, PlainTemplate, VicunaTemplate
from src.model.projector import PROJECTORS, LinearProjector, MLPProjector
from src.registry import Registry


@pytest.fixture
def widgets() -> Registry:
    registry: Registry = Registry("widget")

    @registry.register("round")
    class Round:
        def __init__(self, size: int = 1) -> None:
            self.size = size

    @registry.register("square")
    class Square:
        pass

    return registry


def test_exact_name_lookup_returns_the_registered_item(widgets):
    round_cls = widgets.get("round")
    assert round_cls.__name__ == "Round"
    assert widgets.get("square").__name__ == "Square"
    assert widgets.names() == ["round", "square"]
    assert "round" in widgets and "Round" not in widgets


@pytest.mark.parametrize("name", ["Round", "roun", "round ", "ROUND", "rounds"])
def test_near_misses_are_not_matched(widgets, name):
    with pytest.raises(ValueError) as info:
        widgets.get(name)
    assert str(info.value) == f"unknown widget {name!r}; choose one of ['round', 'square']"


def test_register_returns_the_item_unchanged():
    registry: Registry = Registry("thing")

    def builder():
        return 42

    assert registry.register("b")(builder) is builder
    assert registry.build("b") == 42


def test_build_passes_keyword_arguments(widgets):
    built = widgets.build("round", size=7)
    assert type(built).__name__ == "Round" and built.size == 7


def test_double_registration_is_an_error(widgets):
    with pytest.raises(ValueError, match=re.escape("widget 'round' registered twice")):
        widgets.register("round")(object)
    assert widgets.get("round").__name__ == "Round"  # the first registration stays


def test_builtin_registries_hold_their_parts():
    assert PROJECTORS.names() == [
        "avgpool",
        "c_abstractor",
        "identity",
        "ldp",
        "linear",
        "mlp",
        "pixel_shuffle",
        "resampler",
    ]
    assert PROJECTORS.get("linear") is LinearProjector and PROJECTORS.get("mlp") is MLPProjector
    assert TEMPLATES.names() == ["chat_template", "llama2", "plain", "vicuna_v1"]
    assert TEMPLATES.get("plain") is PlainTemplate and TEMPLATES.get("vicuna_v1") is VicunaTemplate
    with pytest.raises(
        ValueError,
        match=re.escape(
            "unknown conversation template 'vicuna'; choose one of ['chat_template', 'llama2', 'plain', 'vicuna_v1']"
        ),
    ):
        TEMPLATES.get("vicuna")
