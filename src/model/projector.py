"""Projectors: vision features -> LLM embedding space. One registry, swapped by name.

Adding one is a class with a `@PROJECTORS.register("name")` decorator in this file: it
takes (in_dim, out_dim, **options) and reports how many tokens it makes of a grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from src.registry import Registry


class Projector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim

    def num_tokens(self, in_tokens: int) -> int:
        """Output tokens per image for `in_tokens` input tokens."""
        return in_tokens


PROJECTORS: Registry[type[Projector]] = Registry("projector")


@PROJECTORS.register("linear")
class LinearProjector(Projector):
    """LLaVA-1's projector: one linear map per token."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(in_dim, out_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@PROJECTORS.register("mlp")
class MLPProjector(Projector):
    """LLaVA-1.5's `mlp2x_gelu` at depth 2: Linear, then (GELU, Linear) x (depth - 1)."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2) -> None:
        super().__init__(in_dim, out_dim)
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


def build_projector(config: ProjectorConfig, in_dim: int, out_dim: int) -> Projector:
    cls = PROJECTORS.get(config.name)
    try:
        return cls(in_dim, out_dim, **config.kwargs)
    except TypeError as error:
        raise ValueError(f"projector {config.name!r} does not take options {config.kwargs}: {error}") from error
