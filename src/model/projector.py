"""Projectors: vision features -> LLM embedding space. One registry, swapped by name.

Adding one is a class with a `@PROJECTORS.register("name")` decorator in this file: it
takes (in_dim, out_dim, grid, prefix_tokens, **options) and reports in `num_tokens` how
many tokens it makes of one image's features; the data pipeline expands each `<image>`
tag into exactly that many placeholders.

Token-wise projectors (`identity`, `linear`, `mlp`) keep every token; `resampler` makes a
fixed number whatever the input; the spatial ones (`pixel_shuffle`, `avgpool`,
`c_abstractor`, `ldp`) shrink the patch grid and so need it bare, without prefix tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from src.registry import Registry


class Projector(nn.Module):
    """Maps (images, prefix_tokens + grid_h * grid_w, in_dim) to (images, num_tokens, out_dim).

    The tower's features arrive with its kept prefix tokens (CLS, registers) first, then
    the patch grid in row-major order.
    """

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, int], prefix_tokens: int = 0) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.grid = (int(grid[0]), int(grid[1]))
        self.prefix_tokens = prefix_tokens

    @property
    def num_tokens(self) -> int:
        """Output tokens per image; token-wise projectors keep every input token."""
        return self.prefix_tokens + self.grid[0] * self.grid[1]

    def require_plain_grid(self, name: str) -> None:
        """Spatial projectors need the bare patch grid, without CLS or register tokens."""
        if self.prefix_tokens:
            raise ValueError(
                f"projector {name!r} works on the patch grid but the tower keeps {self.prefix_tokens} prefix "
                "token(s); set vision.feature_select: patch"
            )


PROJECTORS: Registry[type[Projector]] = Registry("projector")


# ---- shared pieces ---------------------------------------------------------------------
def _int_option(name: str, option: str, value: object, minimum: int, hint: str = "") -> int:
    """Options come from YAML, so a string or float must fail here, not deep in a layer."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} {option} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} {option} must be >= {minimum}, got {value!r}{hint}")
    return value


def _bool_option(name: str, option: str, value: object) -> bool:
    """A YAML `"false"` string is truthy; refuse it rather than silently enable the option."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} {option} must be true or false, got {value!r}")
    return value


def _mlp(name: str, in_dim: int, out_dim: int, depth: object, act: type[nn.Module] = nn.GELU) -> nn.Sequential:
    """LLaVA-1.5's readout: Linear, then (act, Linear) x (depth - 1); all at out_dim width."""
    depth = _int_option(name, "depth", depth, 1)
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [act(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


def to_grid(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(images, h*w, C) -> (images, C, h, w); a wrong token count would otherwise reshape silently wrong."""
    h, w = grid
    if x.shape[1] != h * w:
        raise ValueError(f"expected {h * w} tokens (a {h}x{w} patch grid), got {x.shape[1]}")
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


def from_grid(x: torch.Tensor) -> torch.Tensor:
    """(images, C, h, w) -> (images, h*w, C), row-major like the tower's own order."""
    return x.flatten(2).transpose(1, 2)


def _pooled_grid(name: str, grid: tuple[int, int], side: int | None, asked: str) -> tuple[int, int]:
    """None halves each side (ceil): 4x fewer tokens, and 24x24 -> 144 as in Honeybee's default."""
    h, w = grid
    if side is None:
        return (h + 1) // 2, (w + 1) // 2
    if side > min(h, w):
        raise ValueError(
            f"{name} {asked} does not fit the {h}x{w} patch grid: pooling only shrinks a grid, "
            f"so the side must be at most {min(h, w)}"
        )
    return side, side


def space_to_depth(x: torch.Tensor, grid: tuple[int, int], factor: int) -> torch.Tensor:
    """(images, h*w, C) -> (images, h*w / r^2, r^2 * C); each r x r block becomes one token.

    Channels are ordered (row in block, column in block, channel), as nanoVLM and Idefics3
    order them, so weights trained there keep their meaning here.
    """
    b, _, c = x.shape
    h, w = grid
    r = factor
    x = to_grid(x, grid).reshape(b, c, h // r, r, w // r, r)
    x = x.permute(0, 2, 4, 3, 5, 1)  # images, rows, cols, row in block, col in block, C
    return x.reshape(b, (h // r) * (w // r), r * r * c)


def sincos_2d(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """(h*w, dim) fixed position codes as in MAE, half per axis: sin(y), cos(y), sin(x), cos(x).

    Fixed rather than learned so a resampler can be built for any grid; columns past the
    last multiple of 4 stay zero.
    """
    h, w = grid
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    y = ys.reshape(-1, 1) * omega
    x = xs.reshape(-1, 1) * omega
    codes = torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)
    return F.pad(codes, (0, dim - 4 * quarter)).float()


class _SqueezeExcite(nn.Module):
    """Channel gating from the pooled grid; both Honeybee's and MobileVLM's blocks use it."""

    def __init__(self, channels: int, squeeze: int, act: type[nn.Module], gate: type[nn.Module]) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.act = act()
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(x.mean((2, 3), keepdim=True)))))


def _conv_norm(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """LayerNorm, not BatchNorm: batches of images are small and mixed, as in both source kits."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=False)
    return nn.Sequential(conv, LayerNorm2d(out_ch))


class _RegNetBlock(nn.Module):
    """Honeybee's block: timm's RegNet bottleneck at bottleneck ratio 1 and group size 1, SiLU.

    1x1 conv, depthwise 3x3, squeeze-excite, 1x1 conv, plus a (projected) shortcut: the 3x3
    mixes neighbouring patches, which is the locality C-Abstractor is named for.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv1 = _conv_norm(in_dim, out_dim, 1)
        self.conv2 = _conv_norm(out_dim, out_dim, 3, groups=out_dim)
        self.se = _SqueezeExcite(out_dim, max(1, round(in_dim / 4)), nn.SiLU, nn.Sigmoid)
        self.conv3 = _conv_norm(out_dim, out_dim, 1)
        self.shortcut = nn.Identity() if in_dim == out_dim else _conv_norm(in_dim, out_dim, 1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.se(self.act(self.conv2(self.act(self.conv1(x))))))
        return self.act(y + self.shortcut(x))


def _make_divisible(value: float, divisor: int = 8) -> int:
    """MobileNetV3's channel rounding, so the squeeze width matches MobileVLM's."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class _InvertedResidual(nn.Module):
    """MobileVLM's MobileNetV3 block at expansion 1: depthwise 3x3 + Hardswish, SE, pointwise.

    At stride 2 it halves each side (ceil) and drops the residual, as torchvision's does.
    """

    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        self.depthwise = _conv_norm(dim, dim, 3, stride, groups=dim)
        self.act = nn.Hardswish()
        self.se = _SqueezeExcite(dim, _make_divisible(dim // 4), nn.ReLU, nn.Hardsigmoid)
        self.pointwise = _conv_norm(dim, dim, 1)
        self.residual = stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pointwise(self.se(self.act(self.depthwise(x))))
        return x + y if self.residual else y


class _CrossAttentionBlock(nn.Module):
    """Pre-norm queries -> features attention, then an MLP; keys carry positions, values do not."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm_queries = nn.LayerNorm(width)
        self.norm_features = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, queries: torch.Tensor, features: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        values = self.norm_features(features)
        attended, _ = self.attn(self.norm_queries(queries), values + key_pos, values, need_weights=False)
        queries = queries + attended
        return queries + self.mlp(self.norm_mlp(queries))


# ---- the projectors --------------------------------------------------------------------
@PROJECTORS.register("identity")
class IdentityProjector(Projector):
    """No parameters: for a tower already trained into the LLM's space (or an ablation baseline)."""

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, int], prefix_tokens: int = 0) -> None:
        super().__init__(in_dim, out_dim, grid, prefix_tokens)
        if in_dim != out_dim:
            raise ValueError(
                f"projector 'identity' needs the tower width ({in_dim}) to equal the LLM width ({out_dim}); "
                "use linear or mlp to map between them"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@PROJECTORS.register("linear")
class LinearProjector(Projector):
    """LLaVA-1's projector: one linear map per token."""

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, int], prefix_tokens: int = 0) -> None:
        super().__init__(in_dim, out_dim, grid, prefix_tokens)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@PROJECTORS.register("mlp")
class MLPProjector(Projector):
    """LLaVA-1.5's `mlp2x_gelu` at depth 2: Linear, then (GELU, Linear) x (depth - 1)."""

    def __init__(
        self, in_dim: int, out_dim: int, grid: tuple[int, int], prefix_tokens: int = 0, depth: int = 2
    ) -> None:
        super().__init__(in_dim, out_dim, grid, prefix_tokens)
        self.layers = _mlp("mlp", in_dim, out_dim, depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@PROJECTORS.register("pixel_shuffle")
class PixelShuffleProjector(Projector):
    """nanoVLM / Idefics3 / SmolVLM: each `factor` x `factor` block of patches becomes one token.

    Nothing is averaged away: the block's features are concatenated (in_dim * factor^2
    channels) before the MLP. `depth=1` is exactly nanoVLM's and Idefics3's single linear
    map; the default 2 adds LLaVA-1.5's GELU layer, as InternVL does after its shuffle.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        grid: tuple[int, int],
        prefix_tokens: int = 0,
        factor: int = 2,
        depth: int = 2,
    ) -> None:
        super().__init__(in_dim, out_dim, grid, prefix_tokens)
        self.require_plain_grid("pixel_shuffle")
        self.factor = _int_option("pixel_shuffle", "factor", factor, 1)
        h, w = self.grid
        if h % factor or w % factor:
            common = [r for r in range(2, min(h, w) + 1) if h % r == 0 and w % r == 0]
            fix = f"use factor in {common}" if common else "no factor > 1 divides both; use avgpool or ldp"
            raise ValueError(f"pixel_shuffle factor {factor} does not divide the {h}x{w} patch grid; {fix}")
        self.mlp = _mlp("pixel_shuffle", in_dim * factor * factor, out_dim, depth)

    @property
    def num_tokens(self) -> int:
        return (self.grid[0] // self.factor) * (self.grid[1] // self.factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(space_to_depth(x, self.grid, self.factor))


@PROJECTORS.register("avgpool")
class AvgPoolProjector(Projector):
    """Adaptive average pooling of the patch grid, then an MLP: Honeybee's pooling baseline, PLLaVA's pooling.

    Pooling first runs the MLP on the fewer tokens (at depth 1 the order would not
    matter: averaging commutes with an affine map). `size` k gives k x k tokens; the
    default halves each side (ceil), 24x24 -> 12x12.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        grid: tuple[int, int],
        prefix_tokens: int = 0,
        size: int | None = None,
        depth: int = 2,
    ) -> None:
        super().__init__(in_dim, out_dim, grid, prefix_tokens)
        self.require_plain_grid("avgpool")
        if size is not None:
            _int_option("avgpool", "size", size, 1)
        self.out_grid = _pooled_grid("avgpool", self.grid, size, f"size={size}")
        self.mlp = _mlp("avgpool", in_dim, out_dim, depth)

    @property
    def num_tokens(self) -> int:
        return self.out_grid[0] * self.out_grid[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(from_grid(F.adaptive_avg_pool2d(to_grid(x, self.grid), self.out_grid)))


@PROJECTORS.register("resampler")
class ResamplerProjector(Projector):
    """Perceiver / Qwen-VL / TinyLLaVA resampler: `num_queries` learned queries read the features.

    The token count is fixed whatever the grid, and prefix tokens are simply more keys.
    Each layer is cross-attention then an MLP (Qwen-VL's single layer has no MLP; Flamingo
    also lets queries attend to themselves). Keys get fixed 2D sin-cos positions on the
    grid (zero for prefix tokens), as Qwen-VL's do, so queries can tell where a patch is.
    `width` defaults to the tower's, keeping the layers about one tower block in size.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        grid: tuple[int, int],
        prefix_tokens: int = 0,
        num_queries: int = 64,
        layers: int = 3,
        heads: int = 8,
        width: int | None = None,
        pos_embed: bool = True,
    ) -> None:
        super().__init__(in_dim, out_dim, grid, prefix_tokens)
        self.num_queries = _int_option("resampler", "num_queries", num_queries, 1)
        layers = _int_option("resampler", "layers", layers, 1)
        heads = _int_option("resampler", "heads", heads, 1)
        width = in_dim if width is None else _int_option("resampler", "width", width, 1)
        if width % heads:
            fits = [n for n in range(1, min(width, 64) + 1) if width % n == 0]
            raise ValueError(
                f"resampler heads={heads} does not divide the width {width}; use heads in {fits} or change width"
            )
        key_pos = torch.zeros(prefix_tokens + self.grid[0] * self.grid[1], width)
        if _bool_option("resampler", "pos_embed", pos_embed):
            key_pos[prefix_tokens:] = sincos_2d(self.grid, width)
        self.register_buffer("key_pos", key_pos, persistent=False)  # derived from the grid, not learned
        self.queries = nn.Parameter(nn.init.trunc_normal_(torch.empty(self.num_queries, width), std=0.02))
        self.proj_in = nn.Identity() if in_dim == width else nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(_CrossAttentionBlock(width, heads) for _ in range(layers))
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, out_dim)

    @property
    def num_tokens(self) -> int:
        return self.num_queries

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.proj_in(x)
        key_pos = self.key_pos.to(features.dtype)
        queries = self.queries.to(features.dtype).expand(x.shape[0], -1, -1)
        for block in self.blocks:
            queries = block(queries, features, key_pos)
        return self.proj_out(self.norm_out(queries))


@PROJECTORS.register("c_abstractor")
class CAbstractorProjector(Projector):
    """Honeybee's C-Abstractor (Cha et al., CVPR 2024): RegNet blocks, pool, RegNet blocks, MLP.

    Convolutions before and after the pooling keep local context that a resampler's
    global attention loses. `num_queries` (a perfect square) or `size` picks the pooled
    k x k grid; neither halves each side, which is Honeybee's 144 on a 24x24 grid.
    `hidden` defaults to the tower width (Honeybee: 1024 on CLIP-L), `depth` is blocks per
    stage, and the readout is Honeybee's SiLU MLP. `pos_embed` adds a learned position
    embedding to the input grid, as Honeybee does.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        grid: tuple[int, int],
        prefix_tokens: int = 0,
        num_queries: int | None = None,
        size: int | None = None,
        hidden: int | None = None,
        depth: int = 3,
        mlp_depth: int = 2,
        pos_embed: bool = True,
    ) -> None:
        super().__init__(in_dim, out_dim, grid, prefix_tokens)
        self.require_plain_grid("c_abstractor")
        name = "c_abstractor"
        if num_queries is not None and size is not None:
            raise ValueError(f"{name} takes num_queries or size, not both; got num_queries={num_queries}, size={size}")
        if num_queries is not None:
            _int_option(name, "num_queries", num_queries, 1)
            side = math.isqrt(num_queries)
            if side * side != num_queries:
                raise ValueError(
                    f"{name} num_queries must be a perfect square (it pools to a k x k grid), got {num_queries}; "
                    f"use {side * side} or {(side + 1) ** 2}"
                )
            asked = f"num_queries={num_queries} (a {side}x{side} grid)"
        else:
            side = None if size is None else _int_option(name, "size", size, 1)
            asked = f"size={size}"
        self.out_grid = _pooled_grid(name, self.grid, side, asked)
        hidden = in_dim if hidden is None else _int_option(name, "hidden", hidden, 1)
        depth = _int_option(name, "depth", depth, 1, hint="; with no blocks it is avgpool")
        self.pos_embed: nn.Parameter | None = None
        if _bool_option(name, "pos_embed", pos_embed):
            self.pos_embed = nn.Parameter(
                nn.init.trunc_normal_(torch.empty(1, self.grid[0] * self.grid[1], in_dim), std=0.02)
            )
        self.stage1 = nn.Sequential(*(_RegNetBlock(in_dim if i == 0 else hidden, hidden) for i in range(depth)))
        self.pool = nn.AdaptiveAvgPool2d(self.out_grid)
        self.stage2 = nn.Sequential(*(_RegNetBlock(hidden, hidden) for _ in range(depth)))
        self.readout = _mlp(name, hidden, out_dim, _int_option(name, "mlp_depth", mlp_depth, 1), act=nn.SiLU)

    @property
    def num_tokens(self) -> int:
        return self.out_grid[0] * self.out_grid[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_grid(x, self.grid)
        if self.pos_embed is not None:
            x = x + to_grid(self.pos_embed, self.grid).to(x.dtype)
        x = self.stage2(self.pool(self.stage1(x)))
        return self.readout(from_grid(x))


@PROJECTORS.register("ldp")
class LDPProjector(Projector):
    """MobileVLM's lightweight downsample projector (LDP, v1): MLP, then two MobileNetV3 blocks.

    The token-wise MLP (Linear, GELU, Linear) maps to the LLM width first, so the blocks run
    at out_dim; the stride-1 block mixes neighbours, the stride-2 block halves each side
    (ceil), giving 4x fewer tokens. No options: v1 has none.
    """

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, int], prefix_tokens: int = 0) -> None:
        super().__init__(in_dim, out_dim, grid, prefix_tokens)
        self.require_plain_grid("ldp")
        self.mlp = _mlp("ldp", in_dim, out_dim, 2)
        self.blocks = nn.Sequential(_InvertedResidual(out_dim, stride=1), _InvertedResidual(out_dim, stride=2))

    @property
    def num_tokens(self) -> int:
        return ((self.grid[0] + 1) // 2) * ((self.grid[1] + 1) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return from_grid(self.blocks(to_grid(self.mlp(x), self.grid)))


@dataclass
class ProjectorConfig:
    name: str = "mlp"
    """Registered projector name (see `PROJECTORS.names()`)."""
    kwargs: dict = field(default_factory=dict)
    """Options of that projector, e.g. `{depth: 2}` for `mlp`."""

    def __post_init__(self) -> None:
        PROJECTORS.get(self.name)  # an unknown name stops the config here, not when the model is built


def build_projector(
    config: ProjectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int], prefix_tokens: int = 0
) -> Projector:
    """`grid` and `prefix_tokens` describe the tower's output for one image (or one crop)."""
    cls = PROJECTORS.get(config.name)
    try:
        return cls(in_dim, out_dim, grid, prefix_tokens, **config.kwargs)
    except TypeError as error:
        raise ValueError(f"projector {config.name!r} does not take options {config.kwargs}: {error}") from error
