"""Values every layer agrees on, defined once: data writes them, the model reads them, training
and export name them. A value that two layers each spelt out would drift apart silently (a label
ignored by the loss but counted by the telemetry, a part the stage trains but the checkpoint drops).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
"""Label of a position that is not supervised: transformers' and PyTorch's cross-entropy ignore it."""

IMAGE_TAG = "<image>"
"""The image placeholder in LLaVA-format text, and the added special token it becomes; the model
replaces each such token by one image feature (LLaVA's `DEFAULT_IMAGE_TOKEN`)."""

PARTS = ("vision", "projector", "llm")
"""The parts of a LLaVA model, in forward order: what a stage freezes or trains, what a checkpoint
holds, what weights load by (`LlavaModel` attributes of the same names)."""

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Parameter dtypes by the names configs use."""

__all__ = ["DTYPES", "IGNORE_INDEX", "IMAGE_TAG", "PARTS"]
