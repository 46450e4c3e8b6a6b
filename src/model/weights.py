"""Loading weights into a built LlavaModel from an earlier run or an imported model.

A stage starts from what an earlier stage trained (the stage-1 projector into stage 2) or
from a released model (`python -m src.export from-hf`). Parts are all or nothing: a part
named in the file must be there whole and with the shapes this model has, so a recipe that
changed a width or a depth fails at start-up with the names, not later with wrong numbers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

PARTS = ("vision", "projector", "llm")


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a state-dict file or of a Lightning checkpoint's model (never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from: no file {path}")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):  # a Lightning checkpoint
        loaded = {k.removeprefix("model."): v for k, v in loaded["state_dict"].items() if k.startswith("model.")}
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"init_from: {path} is neither a state dict of tensors nor a Lightning checkpoint")
    return loaded


def load_parts(model: nn.Module, state: dict[str, torch.Tensor], source: str = "init_from") -> list[str]:
    """Copies whole parts (vision, projector, llm) into `model`; returns the parts loaded."""
    own = model.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    parts = [p for p in PARTS if any(k.startswith(f"{p}.") for k in state)]
    missing = sorted(k for k in own if k.split(".", 1)[0] in parts and k not in state)
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    )
    problems = []
    if unexpected:
        problems.append(f"keys this model does not have: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if missing:
        problems.append(f"keys missing from parts {parts}: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if shapes:
        problems.append("shape mismatch: " + "; ".join(shapes[:8]))
    if problems:
        raise ValueError(f"{source}: the weights do not fit this model's config; " + " | ".join(problems))
    model.load_state_dict(state, strict=False)
    return parts
