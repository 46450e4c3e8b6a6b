"""src.model.projector: the registry by name, shapes and token counts, maths and option errors."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from src.model.projector import (
    PROJECTORS,
    AvgPoolProjector,
    CAbstractorProjector,
    IdentityProjector,
    LDPProjector,
    LinearProjector,
    MLPProjector,
    PixelShuffleProjector,
    Projector,
    ProjectorConfig,
    ResamplerProjector,
    build_projector,
    sincos_2d,
    space_to_depth,
)

pytestmark = pytest.mark.usefixtures("single_thread")

IN, OUT = 8, 12
# keeps the heavier projectors tiny; every other registered projector runs on its defaults
TINY = {"resampler": {"num_queries": 5, "layers": 1, "heads": 2}, "c_abstractor": {"depth": 1}}
# projectors that reshape the patch grid, so refuse prefix tokens; a new one must be sorted here
SPATIAL = {"pixel_shuffle", "avgpool", "c_abstractor", "ldp"}
TOKEN_WISE = {"identity", "linear", "mlp", "resampler"}


def make(name: str, grid: tuple[int, int], prefix_tokens: int = 0, **kwargs) -> Projector:
    out_dim = IN if name == "identity" else OUT
    options = {**TINY.get(name, {}), **kwargs}
    return build_projector(ProjectorConfig(name, options), IN, out_dim, grid, prefix_tokens)


def tokens(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Reference (images, h*w, C) -> (images, C, h, w), written out independently of the module."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)


# ---- registry ------------------------------------------------------------------------
def test_unknown_projector_names_itself_and_the_choices():
    with pytest.raises(ValueError) as info:
        build_projector(ProjectorConfig("nope"), 8, 16, (4, 4))
    message = str(info.value)
    assert "'nope'" in message
    assert "['avgpool', 'c_abstractor', 'identity', 'ldp', 'linear', 'mlp', 'pixel_shuffle', 'resampler']" in message


def test_names_are_exact():
    with pytest.raises(ValueError, match="unknown projector 'MLP'"):
        build_projector(ProjectorConfig("MLP"), 8, 16, (4, 4))


def test_every_projector_is_sorted_as_spatial_or_token_wise():
    assert SPATIAL | TOKEN_WISE == set(PROJECTORS.names())


@pytest.mark.parametrize("name", PROJECTORS.names())
def test_wrong_case_of_every_name_is_refused(name):
    with pytest.raises(ValueError, match=re.escape(f"unknown projector {name.upper()!r}; choose one of [")):
        build_projector(ProjectorConfig(name.upper()), IN, OUT, (4, 4))


# ---- every projector: shapes, token counts, gradients --------------------------------
@pytest.mark.parametrize("grid", [(4, 4), (6, 6), (4, 6)])
@pytest.mark.parametrize("name", PROJECTORS.names())
def test_output_length_is_num_tokens(name, grid):
    torch.manual_seed(0)
    projector = make(name, grid)
    y = projector(torch.randn(3, grid[0] * grid[1], IN))
    assert y.shape == (3, projector.num_tokens, projector.out_dim)


@pytest.mark.parametrize("grid", [(5, 3), (1, 1)])
@pytest.mark.parametrize("name", sorted(set(PROJECTORS.names()) - {"pixel_shuffle"}))
def test_odd_grids_keep_num_tokens_exact(name, grid):
    projector = make(name, grid)
    y = projector(torch.randn(2, grid[0] * grid[1], IN))
    assert y.shape == (2, projector.num_tokens, projector.out_dim)


# tokens for CLIP-L/14-336's 24x24 grid on defaults (the README table); a new projector goes in both
DEFAULT_TOKENS_24 = {
    "identity": 576,
    "linear": 576,
    "mlp": 576,
    "pixel_shuffle": 144,
    "avgpool": 144,
    "c_abstractor": 144,
    "ldp": 144,
    "resampler": 64,
}


@pytest.mark.parametrize("name", PROJECTORS.names())
def test_default_token_counts_on_a_24x24_grid(name):
    out_dim = IN if name == "identity" else OUT
    projector = build_projector(ProjectorConfig(name), IN, out_dim, (24, 24))
    assert projector.num_tokens == DEFAULT_TOKENS_24[name]
    assert projector(torch.randn(1, 576, IN)).shape == (1, DEFAULT_TOKENS_24[name], out_dim)


@pytest.mark.parametrize("name", PROJECTORS.names())
def test_backward_reaches_every_parameter_and_the_input(name):
    torch.manual_seed(0)
    projector = make(name, (4, 6))
    x = torch.randn(2, 24, IN, requires_grad=True)
    projector(x).square().mean().backward()
    for param_name, param in projector.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", PROJECTORS.names())
def test_runs_in_bfloat16(name):
    projector = make(name, (4, 4)).to(torch.bfloat16)
    y = projector(torch.randn(2, 16, IN, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (2, projector.num_tokens, projector.out_dim)


@pytest.mark.parametrize("name", PROJECTORS.names())
def test_prefix_tokens_are_kept_or_refused(name):
    if name in SPATIAL:
        message = (
            f"projector {name!r} works on the patch grid but the tower keeps 1 prefix token(s); "
            "set vision.feature_select: patch"
        )
        with pytest.raises(ValueError, match=re.escape(message)):
            make(name, (4, 4), prefix_tokens=1)
        return
    projector = make(name, (4, 4), prefix_tokens=1)
    y = projector(torch.randn(2, 17, IN))
    assert y.shape == (2, projector.num_tokens, projector.out_dim)
    assert projector.num_tokens == (5 if name == "resampler" else 17)


@pytest.mark.parametrize("name", sorted(SPATIAL))
def test_spatial_projectors_refuse_a_wrong_token_count(name):
    projector = make(name, (4, 4))
    with pytest.raises(ValueError, match=re.escape("expected 16 tokens (a 4x4 patch grid), got 15")):
        projector(torch.randn(1, 15, IN))


@pytest.mark.parametrize("name", PROJECTORS.names())
def test_unknown_option_of_every_projector_is_named(name):
    with pytest.raises(ValueError, match=re.escape(f"projector {name!r} does not take options {{'bogus': 1}}: ")):
        build_projector(ProjectorConfig(name, {"bogus": 1}), IN, IN, (4, 4))


# ---- identity, linear, mlp -----------------------------------------------------------
def test_identity_returns_its_input_and_has_no_parameters():
    projector = make("identity", (4, 4), prefix_tokens=1)
    assert isinstance(projector, IdentityProjector)
    x = torch.randn(2, 17, IN)
    assert projector(x) is x
    assert list(projector.parameters()) == []


def test_identity_needs_equal_widths():
    message = "projector 'identity' needs the tower width (8) to equal the LLM width (12); use linear or mlp"
    with pytest.raises(ValueError, match=re.escape(message)):
        build_projector(ProjectorConfig("identity"), 8, 12, (4, 4))


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
        expected = lin(F.gelu(expected))
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


# ---- pixel_shuffle ---------------------------------------------------------------------
def test_space_to_depth_order_by_hand():
    # a 2x4 grid of one-channel tokens numbered row-major:  0 1 2 3 / 4 5 6 7
    x = torch.arange(8.0).reshape(1, 8, 1)
    expected = torch.tensor([[[0.0, 1, 4, 5], [2, 3, 6, 7]]])  # (row in block, col in block)
    torch.testing.assert_close(space_to_depth(x, (2, 4), 2), expected)


@pytest.mark.parametrize(("grid", "factor"), [((4, 6), 2), ((6, 3), 3), ((2, 2), 1)])
def test_space_to_depth_against_a_loop(grid, factor):
    h, w = grid
    x = torch.randn(2, h * w, 3)
    blocks = []
    for i in range(h // factor):
        for j in range(w // factor):
            cells = [x[:, (i * factor + dy) * w + j * factor + dx] for dy in range(factor) for dx in range(factor)]
            blocks.append(torch.cat(cells, dim=-1))
    torch.testing.assert_close(space_to_depth(x, grid, factor), torch.stack(blocks, dim=1))


def test_pixel_shuffle_is_space_to_depth_then_the_mlp():
    projector = make("pixel_shuffle", (4, 6), factor=2, depth=1)
    assert isinstance(projector, PixelShuffleProjector)
    linear = projector.mlp[0]
    assert (linear.in_features, linear.out_features) == (IN * 4, OUT)
    x = torch.randn(2, 24, IN)
    torch.testing.assert_close(projector(x), linear(space_to_depth(x, (4, 6), 2)))
    assert projector.num_tokens == 6


def test_pixel_shuffle_default_mlp_is_two_layers_on_the_stacked_channels():
    projector = make("pixel_shuffle", (4, 4))
    assert [type(m) for m in projector.mlp] == [nn.Linear, nn.GELU, nn.Linear]
    assert projector.mlp[0].in_features == IN * 4 and projector.num_tokens == 4


@pytest.mark.parametrize(
    ("grid", "kwargs", "message"),
    [
        ((4, 6), {"factor": 3}, "pixel_shuffle factor 3 does not divide the 4x6 patch grid; use factor in [2]"),
        ((12, 12), {"factor": 5}, "pixel_shuffle factor 5 does not divide the 12x12 patch grid; use factor in [2, 3, 4, 6, 12]"),
        ((5, 3), {}, "pixel_shuffle factor 2 does not divide the 5x3 patch grid; no factor > 1 divides both; use avgpool or ldp"),
        ((4, 4), {"factor": 0}, "pixel_shuffle factor must be >= 1, got 0"),
        ((4, 4), {"factor": "2"}, "pixel_shuffle factor must be an integer, got '2'"),
        ((4, 4), {"depth": 0}, "pixel_shuffle depth must be >= 1, got 0"),
    ],
)  # fmt: skip
def test_pixel_shuffle_errors(grid, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make("pixel_shuffle", grid, **kwargs)


# ---- avgpool ---------------------------------------------------------------------------
def test_avgpool_is_adaptive_pooling_then_the_mlp():
    torch.manual_seed(0)
    projector = make("avgpool", (4, 6), size=3)
    assert isinstance(projector, AvgPoolProjector)
    x = torch.randn(2, 24, IN)
    pooled = F.adaptive_avg_pool2d(tokens(x, (4, 6)), 3).flatten(2).transpose(1, 2)
    torch.testing.assert_close(projector(x), projector.mlp(pooled))
    assert projector.num_tokens == 9


def test_avgpool_means_each_block_by_hand():
    projector = make("avgpool", (4, 4), size=2, depth=1)
    x = torch.randn(1, 16, IN)
    top_left = x[:, [0, 1, 4, 5]].mean(1)
    bottom_right = x[:, [10, 11, 14, 15]].mean(1)
    y = projector(x)
    torch.testing.assert_close(y[:, 0], projector.mlp(top_left))
    torch.testing.assert_close(y[:, 3], projector.mlp(bottom_right))


def test_avgpool_default_halves_each_side_rounding_up():
    assert make("avgpool", (5, 3)).out_grid == (3, 2)
    assert make("avgpool", (24, 24)).num_tokens == 144


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 5}, "avgpool size=5 does not fit the 4x6 patch grid: pooling only shrinks a grid, so the side must be at most 4"),
        ({"size": 0}, "avgpool size must be >= 1, got 0"),
        ({"size": 2.0}, "avgpool size must be an integer, got 2.0"),
        ({"depth": 0}, "avgpool depth must be >= 1, got 0"),
    ],
)  # fmt: skip
def test_avgpool_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make("avgpool", (4, 6), **kwargs)


# ---- resampler -------------------------------------------------------------------------
def test_sincos_2d_values_by_hand():
    codes = sincos_2d((2, 3), 10)  # a quarter of 10 is 2 frequencies: 1 and 1/100; 2 columns left zero
    assert codes.shape == (6, 10)
    y, x = 1, 2
    expected = [math.sin(y), math.sin(y / 100), math.cos(y), math.cos(y / 100)]
    expected += [math.sin(x), math.sin(x / 100), math.cos(x), math.cos(x / 100), 0.0, 0.0]
    torch.testing.assert_close(codes[y * 3 + x], torch.tensor(expected))


def test_resampler_token_count_does_not_depend_on_the_grid():
    for grid in [(2, 2), (6, 6), (3, 5)]:
        projector = make("resampler", grid)
        assert isinstance(projector, ResamplerProjector)
        assert projector(torch.randn(1, grid[0] * grid[1], IN)).shape == (1, 5, OUT)


def test_resampler_keys_get_grid_positions_and_prefix_tokens_none():
    projector = make("resampler", (3, 4), prefix_tokens=2, width=16)
    assert projector.key_pos.shape == (14, 16)
    assert not projector.key_pos[:2].any()
    torch.testing.assert_close(projector.key_pos[2:], sincos_2d((3, 4), 16))
    assert "key_pos" not in projector.state_dict()  # derived from the grid, rebuilt on load
    assert isinstance(projector.proj_in, nn.Linear) and projector.proj_in.out_features == 16


def test_resampler_sees_token_order_only_through_positions():
    torch.manual_seed(0)
    x = torch.randn(2, 16, IN)
    order = torch.randperm(16)
    blind = make("resampler", (4, 4), pos_embed=False)
    torch.testing.assert_close(blind(x[:, order]), blind(x))
    torch.manual_seed(0)
    placed = make("resampler", (4, 4))
    assert not torch.allclose(placed(x[:, order]), placed(x), atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"heads": 3}, "resampler heads=3 does not divide the width 8; use heads in [1, 2, 4, 8] or change width"),
        ({"heads": 4, "width": 6}, "resampler heads=4 does not divide the width 6; use heads in [1, 2, 3, 6] or change width"),
        ({"num_queries": 0}, "resampler num_queries must be >= 1, got 0"),
        ({"layers": 0}, "resampler layers must be >= 1, got 0"),
        ({"width": "wide"}, "resampler width must be an integer, got 'wide'"),
        ({"pos_embed": "false"}, "resampler pos_embed must be true or false, got 'false'"),
    ],
)  # fmt: skip
def test_resampler_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make("resampler", (4, 4), **kwargs)


# ---- c_abstractor ----------------------------------------------------------------------
def test_c_abstractor_structure():
    projector = make("c_abstractor", (6, 6), num_queries=9, hidden=16, depth=2)
    assert isinstance(projector, CAbstractorProjector)
    assert projector.out_grid == (3, 3) and projector.num_tokens == 9
    assert len(projector.stage1) == 2 and len(projector.stage2) == 2
    first = projector.stage1[0]
    assert first.conv1[0].in_channels == IN and first.conv1[0].out_channels == 16
    assert first.conv2[0].groups == 16 and first.conv2[0].kernel_size == (3, 3)  # depthwise 3x3
    assert not isinstance(first.shortcut, nn.Identity)  # 8 -> 16 channels: projected shortcut
    assert isinstance(projector.stage2[0].shortcut, nn.Identity)
    assert [type(m) for m in projector.readout] == [nn.Linear, nn.SiLU, nn.Linear]
    assert projector.pos_embed is not None and projector.pos_embed.shape == (1, 36, IN)
    assert make("c_abstractor", (4, 4), pos_embed=False).pos_embed is None


def test_c_abstractor_size_and_default():
    assert make("c_abstractor", (4, 6), size=3).num_tokens == 9
    assert make("c_abstractor", (5, 3)).out_grid == (3, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_queries": 5}, "c_abstractor num_queries must be a perfect square (it pools to a k x k grid), got 5; use 4 or 9"),
        ({"num_queries": 4, "size": 2}, "c_abstractor takes num_queries or size, not both; got num_queries=4, size=2"),
        ({"num_queries": 25}, "c_abstractor num_queries=25 (a 5x5 grid) does not fit the 4x4 patch grid: pooling only shrinks a grid, so the side must be at most 4"),
        ({"size": 5}, "c_abstractor size=5 does not fit the 4x4 patch grid"),
        ({"depth": 0}, "c_abstractor depth must be >= 1, got 0; with no blocks it is avgpool"),
        ({"mlp_depth": 0}, "c_abstractor mlp_depth must be >= 1, got 0"),
        ({"hidden": 0}, "c_abstractor hidden must be >= 1, got 0"),
        ({"pos_embed": 1}, "c_abstractor pos_embed must be true or false, got 1"),
    ],
)  # fmt: skip
def test_c_abstractor_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make("c_abstractor", (4, 4), **kwargs)


# ---- ldp -------------------------------------------------------------------------------
def test_ldp_structure():
    projector = make("ldp", (5, 3))
    assert isinstance(projector, LDPProjector)
    assert [type(m) for m in projector.mlp] == [nn.Linear, nn.GELU, nn.Linear]
    assert projector.mlp[0].in_features == IN and projector.mlp[0].out_features == OUT
    first, second = projector.blocks
    assert first.residual and first.depthwise[0].stride == (1, 1) and first.depthwise[0].groups == OUT
    assert not second.residual and second.depthwise[0].stride == (2, 2)
    assert projector.num_tokens == 3 * 2


def test_ldp_stride_one_block_is_residual():
    projector = make("ldp", (4, 4))
    block = projector.blocks[0]
    nn.init.zeros_(block.pointwise[1].weight)  # the branch's last norm outputs its bias: zero it too
    nn.init.zeros_(block.pointwise[1].bias)
    grid = torch.randn(2, OUT, 4, 4)
    torch.testing.assert_close(block(grid), grid)
