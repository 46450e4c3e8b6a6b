"""The `fused` family: several towers' patch features concatenated channel-wise (Prismatic's
DINOv2 + SigLIP), each tower built through the registry from its own config."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from src.model.image_transform import ImageTransform
from src.model.vision.base import COMMON_FIELDS, VISION_TOWERS, VisionTower
from src.model.vision.config import DEFAULTS, VisionConfig, as_vision_config


@VISION_TOWERS.register("fused")
class FusedVisionTower(VisionTower):
    """Several towers' patch features concatenated channel-wise (Prismatic's DINOv2 + SigLIP).

    The fused transform gives [0, 1] pixels (mean 0, std 1) at `image_size` (default: the
    largest tower's input); each tower resizes them to its own input size (bicubic,
    antialiased) and normalises with its own mean and std. The `pad` colour is the first
    tower's mean colour.
    """

    type_name = "fused"
    config_fields = COMMON_FIELDS | {"towers"}

    @classmethod
    def weights_from_hub(cls, config: VisionConfig) -> bool:
        """Rebuilt when every one of its towers is."""
        towers = [as_vision_config(tower, f"vision.towers[{i}]") for i, tower in enumerate(config.towers)]
        return bool(towers) and all(VISION_TOWERS.get(t.type).weights_from_hub(t) for t in towers)

    def __init__(self, config: VisionConfig) -> None:
        super().__init__(config)
        if self.keep_prefix:
            raise ValueError("a fused tower concatenates patch grids only; set feature_select: patch")
        if len(config.towers) < 2:
            raise ValueError(f"vision type fused needs at least two towers, got {len(config.towers)}")
        towers = []
        for index, options in enumerate(config.towers):
            where = f"vision.towers[{index}]"
            sub = as_vision_config(options, where)
            if sub.type == "fused":
                raise ValueError(f"{where}: a fused tower's towers cannot be fused themselves")
            stray = [
                f for f in ("image_mode", "anyres_grids", "anyres_merge") if getattr(sub, f) != getattr(DEFAULTS, f)
            ]
            if stray:
                raise ValueError(f"{where}: set {stray} on the fused config, which makes the pixels of all towers")
            if sub.feature_select != "patch":
                raise ValueError(f"{where}: a fused tower concatenates patch grids only; set feature_select: patch")
            towers.append(VISION_TOWERS.get(sub.type)(sub))
        first = towers[0]
        for index, tower in enumerate(towers[1:], start=1):
            if tower.grid != first.grid:
                suggestion = first.grid[0] * tower.patch_size
                raise ValueError(
                    f"fused towers make different token grids: towers[0] {first.grid} at {first.input_size} px and "
                    f"towers[{index}] {tower.grid} at {tower.input_size} px; set towers[{index}].image_size "
                    f"{suggestion} ({first.grid[0]} patches of {tower.patch_size} px) or towers[0].image_size "
                    f"{tower.grid[0] * first.patch_size}"
                )
        self.towers = nn.ModuleList(towers)
        self.input_size = int(config.image_size or max(t.input_size for t in towers))
        self.patch_size = self.input_size // first.grid[0]
        self.fill = first.image_transform().fill_colour
        # plain tuples, not buffers: nothing to lose when a sharded model is materialised from meta
        self.normalisation = [(t.image_transform().mean, t.image_transform().std) for t in towers]
        self._finish()

    @property
    def hidden_size(self) -> int:
        return sum(t.hidden_size for t in self.towers)

    @property
    def grid(self) -> tuple[int, int]:
        return self.towers[0].grid

    @property
    def num_prefix_tokens(self) -> int:
        return 0

    def image_transform(self) -> ImageTransform:
        return ImageTransform(
            self.input_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), self.image_mode, self.anyres_grids, self.fill
        )

    def wrap_modules(self) -> list[nn.Module]:
        return [module for tower in self.towers for module in tower.wrap_modules()]

    def unused_parameters(self) -> list[nn.Parameter]:
        return [param for tower in self.towers for param in tower.unused_parameters()]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, 3, H, W) of [0, 1] pixels -> (images, h * w, sum of the towers' hidden sizes)."""
        features = []
        for tower, (mean, std) in zip(self.towers, self.normalisation, strict=True):
            pixels = pixel_values.float()
            if pixels.shape[-2:] != (tower.input_size, tower.input_size):
                size = (tower.input_size, tower.input_size)
                pixels = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False, antialias=True)
            mean_t, std_t = (torch.tensor(v, device=pixels.device).view(1, 3, 1, 1) for v in (mean, std))
            features.append(tower(((pixels - mean_t) / std_t).to(pixel_values.dtype)))
        return torch.cat(features, dim=-1)
