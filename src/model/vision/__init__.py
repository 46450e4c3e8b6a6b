"""Vision towers: image -> a grid of patch features from a chosen layer, and their image transforms.

LLaVA reads the penultimate layer (-2) of CLIP and drops the CLS token: the last layer is
trained for the contrastive objective and generalises worse as token features. Every tower
keeps only the layers up to the one it reads, so later layers never run.

What lives where:
- `config.py`: `VisionConfig`, the recipe's `model.vision` for every family;
- `base.py`: the `VisionTower` contract every family implements (output shape, transform,
  feature layer and select, the blocks FSDP and activation checkpointing wrap, whether its
  weights are rebuilt from the hub), the `VISION_TOWERS` registry and `build_vision_tower`;
- one file per family, registered under its `VisionConfig.type`: `timm_tower.py` (`timm`),
  `hf_tower.py` (`hf`), `fused_tower.py` (`fused`);
- the image transform the loader workers run is `src.model.image_transform` (no model code).

Adding a family: a `VisionTower` subclass in a new file here, decorated with
`@VISION_TOWERS.register("name")` and imported below; `tests/model/test_contracts.py` then
asks for a tiny config of it and checks the whole contract.
"""

from src.model.image_transform import (
    HALF,
    IMAGE_MODES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageTransform,
    default_anyres_grids,
    expand_to_square,
    resize_and_pad,
    select_best_resolution,
    shortest_edge_size,
)
from src.model.vision.base import VISION_TOWERS, VisionTower, build_vision_tower, weights_from_hub
from src.model.vision.config import ANYRES_MERGES, FEATURE_SELECTS, VisionConfig
from src.model.vision.fused_tower import FusedVisionTower
from src.model.vision.hf_tower import HF_FAMILIES, HFVisionTower
from src.model.vision.timm_tower import DEFAULT_TIMM_MODEL, TimmVisionTower, check_timm_activation

__all__ = [
    "ANYRES_MERGES",
    "DEFAULT_TIMM_MODEL",
    "FEATURE_SELECTS",
    "HALF",
    "HF_FAMILIES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_MODES",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "VISION_TOWERS",
    "FusedVisionTower",
    "HFVisionTower",
    "ImageTransform",
    "TimmVisionTower",
    "VisionConfig",
    "VisionTower",
    "build_vision_tower",
    "check_timm_activation",
    "default_anyres_grids",
    "expand_to_square",
    "resize_and_pad",
    "select_best_resolution",
    "shortest_edge_size",
    "weights_from_hub",
]
