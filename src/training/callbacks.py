"""The kit's Lightning callbacks, by the class paths recipes name (`src.training.callbacks.X`).

Each lives in a module of its own concern; this module only gathers them, so YAML and user code
keep one stable path:

- `TrainingTelemetry` (`src.training.telemetry`): throughput, data wait, memory, gradient norm,
  learning rates and MFU per optimizer step;
- `SampleGenerations` (`src.training.sample_generations`): images with the model's answers and the
  references, to TensorBoard;
- the FLOPs model and peak FLOP/s behind MFU: `src.training.flops`.
"""

from __future__ import annotations

from src.training.flops import (
    PEAK_FLOPS,
    FlopsModel,
    chip_of,
    flops_model,
    flops_model_of,
    flops_per_token,
    mfu,
    peak_flops_of,
)
from src.training.sample_generations import SampleGenerations, readable_prompt, sample_text, unnormalise
from src.training.telemetry import BatchCounts, TrainingTelemetry, gradient_norm, peak_memory_gb

__all__ = [
    "PEAK_FLOPS",
    "BatchCounts",
    "FlopsModel",
    "SampleGenerations",
    "TrainingTelemetry",
    "chip_of",
    "flops_model",
    "flops_model_of",
    "flops_per_token",
    "gradient_norm",
    "mfu",
    "peak_flops_of",
    "peak_memory_gb",
    "readable_prompt",
    "sample_text",
    "unnormalise",
]
