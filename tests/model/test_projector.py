"""src.model.projector: the registry by name, shapes, maths and option errors."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from src.model.projector import LinearProjector, MLPProjector, ProjectorConfig, build_projector

pytestmark = pytest.mark.usefixtures("single_thread")


def test_unknown_projector_names_itself_and_the_choices():
    with pytest.raises(ValueError) as info:
        build_projector(ProjectorConfig("nope"), 8, 16, (4, 4))
    message = str(info.value)
    assert "'nope'" in message
    assert "['linear', 'mlp']" in message


def test_names_are_exact():
    with pytest.raises(ValueError, match="unknown projector 'MLP'"):
        build_projector(ProjectorConfig("MLP"), 8, 16, (4, 4))


def test_linear_projector_shape_and_maths():
    torch.manual_seed(0)
    projector = build_projector(ProjectorConfig("linear"), 8, 12, (4, 4))
    assert isinstance(projector, LinearProjector)
    x = torch.randn(3, 16, 8)
    y = projector(x)
    assert y.shape == (3, 16, 12)
    expected = x @ projector.proj.weight.T + projector.proj.bias
    torch.testing.assert_close(y, expected)
    assert projector.num_tokens == 16
    assert (projector.in_dim, projector.out_dim) == (8, 12)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_mlp_projector_depths(depth):
    torch.manual_seed(0)
    projector = build_projector(ProjectorConfig("mlp", {"depth": depth}), 8, 12, (4, 4))
    assert isinstance(projector, MLPProjector)
    linears = [m for m in projector.layers if isinstance(m, nn.Linear)]
    gelus = [m for m in projector.layers if isinstance(m, nn.GELU)]
    assert len(linears) == depth and len(gelus) == depth - 1
    assert (linears[0].in_features, linears[0].out_features) == (8, 12)
    assert all((lin.in_features, lin.out_features) == (12, 12) for lin in linears[1:])
    x = torch.randn(2, 4, 8)
    y = projector(x)
    assert y.shape == (2, 4, 12)
    # reference: Linear, then (GELU, Linear) x (depth - 1)
    expected = linears[0](x)
    for lin in linears[1:]:
        expected = lin(torch.nn.functional.gelu(expected))
    torch.testing.assert_close(y, expected)
    assert projector.num_tokens == 16


def test_mlp_default_depth_is_two():
    projector = build_projector(ProjectorConfig(), 8, 12, (4, 4))
    assert isinstance(projector, MLPProjector)
    assert [type(m) for m in projector.layers] == [nn.Linear, nn.GELU, nn.Linear]


def test_mlp_depth_zero_is_rejected():
    with pytest.raises(ValueError, match=re.escape("mlp depth must be >= 1, got 0")):
        build_projector(ProjectorConfig("mlp", {"depth": 0}), 8, 12, (4, 4))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("linear", {"depth": 2}), ("mlp", {"width": 3}), ("mlp", {"depth": 2, "bias": False})],
)
def test_unknown_options_are_a_value_error_naming_them(name, kwargs):
    with pytest.raises(ValueError) as info:
        build_projector(ProjectorConfig(name, kwargs), 8, 12, (4, 4))
    assert str(info.value).startswith(f"projector {name!r} does not take options {kwargs}: ")
    assert isinstance(info.value.__cause__, TypeError)
