"""Projectors: vision features -> LLM embedding space. One registry, swapped by name.

Adding one is a class with a `@PROJECTORS.register("name")` decorator in this file: it
takes (in_dim, out_dim, grid, prefix_tokens, **options) and reports in `num_tokens` how
many tokens it makes of one image's features; the data pipeline expands each `<image>`
tag into exactly that many placeholders.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
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
        if depth < 1:
            raise ValueError(f"mlp depth must be >= 1, got {depth}")
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@dataclass
class ProjectorConfig:
    name: str = "mlp"
    """Registered projector name (see `PROJECTORS.names()`)."""
    kwargs: dict = field(default_factory=dict)
    """Options of that projector, e.g. `{depth: 2}` for `mlp`."""


def build_projector(
    config: ProjectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int], prefix_tokens: int = 0
) -> Projector:
    """`grid` and `prefix_tokens` describe the tower's output for one image (or one crop)."""
    cls = PROJECTORS.get(config.name)
    try:
        return cls(in_dim, out_dim, grid, prefix_tokens, **config.kwargs)
    except TypeError as error:
        raise ValueError(f"projector {config.name!r} does not take options {config.kwargs}: {error}") from error
