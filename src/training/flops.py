"""The FLOPs of a LLaVA training step, and the peak FLOP/s of the device it runs on: what MFU
(model FLOPs utilisation) is computed from.

`flops_model` knows which parts of a LLaVA model train (a trained part costs 6N per token, a
frozen part the gradient flows through 4N, a frozen part at the input 2N); `flops_model_of` reads
the counts off a built `LlavaLitModule`. The step's token counts come from the batch
(`src.training.telemetry.BatchCounts`): the LLM's tokens are the batch's real positions, image
placeholders included, so an anyres image costs the tokens it really takes, not views x tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from lightning.pytorch import LightningModule

# ---- peak FLOP/s --------------------------------------------------------------------------

PEAK_FLOPS: dict[str, dict[str, float]] = {
    # dense tensor-core FLOP/s per GPU from NVIDIA's datasheets; the sheets' headline numbers
    # assume 2:4 sparsity and are twice these. H200 computes as H100 SXM (989 dense bf16):
    # Lightning's own table lists H200 at its sparse 2e15, and does not know torch's plain
    # "NVIDIA H200" name, nor the L40S (its "l4" match takes it for an L4).
    "h100 sxm": {"bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "h100 pcie": {"bf16": 756.0e12, "fp16": 756.0e12, "fp8": 1513.0e12, "tf32": 378.0e12, "fp32": 51.2e12},
    "h100 nvl": {"bf16": 835.5e12, "fp16": 835.5e12, "fp8": 1670.5e12, "tf32": 417.5e12, "fp32": 60.0e12},
    "h200": {"bf16": 989.5e12, "fp16": 989.5e12, "fp8": 1979.0e12, "tf32": 494.5e12, "fp32": 67.0e12},
    "h200 nvl": {"bf16": 835.5e12, "fp16": 835.5e12, "fp8": 1670.5e12, "tf32": 417.5e12, "fp32": 60.0e12},
    "a100": {"bf16": 312.0e12, "fp16": 312.0e12, "tf32": 156.0e12, "fp32": 19.5e12},  # 40 and 80 GB, SXM and PCIe
    "l40s": {"bf16": 362.05e12, "fp16": 362.05e12, "fp8": 733.0e12, "tf32": 183.0e12, "fp32": 91.6e12},
}


def chip_of(device_name: str) -> str | None:
    """The `PEAK_FLOPS` row for a name as `torch.cuda.get_device_name` reports it, or None.

    "NVIDIA H100 80GB HBM3" is the SXM board, "NVIDIA H100 PCIe" (or an HBM2e one) the PCIe
    card; "NVIDIA GH200 480GB" has an H100's or H200's compute, so it reads as an H200.
    """
    name = device_name.lower()
    if "h200" in name:
        return "h200 nvl" if "nvl" in name else "h200"
    if "h100" in name:
        if "nvl" in name:
            return "h100 nvl"
        return "h100 pcie" if "pcie" in name or "hbm2e" in name else "h100 sxm"
    if "a100" in name:
        return "a100"
    if "l40s" in name:
        return "l40s"
    return None


def peak_flops_of(device_name: str, dtype: str = "bf16", table: Mapping[str, float] | None = None) -> float | None:
    """Dense peak FLOP/s of one device for `dtype`, or None when unknown.

    `table` (name substring -> FLOP/s, from YAML) is looked at first, so any card can be added
    or a number corrected without code.
    """
    name = device_name.lower()
    for key, flops in (table or {}).items():
        if key.lower() in name:
            return float(flops)
    chip = chip_of(device_name)
    if chip is None:
        return None
    return PEAK_FLOPS[chip].get(dtype)


# ---- the FLOPs model ----------------------------------------------------------------------


@dataclass(frozen=True)
class FlopsModel:
    """Training FLOPs of one LLaVA step, split by what each term scales with.

    Attributes:
        per_token: LLM FLOPs per token it runs (text and image placeholders alike), without
            attention and the output head.
        per_supervised_token: output-head FLOPs per supervised token; the model computes
            logits only there (`LlavaModel.supervised_loss`).
        attention: attention FLOPs per token per token of its example: an example of length
            s costs `attention * s * s`.
        per_view: vision tower and projector FLOPs per image view.
    """

    per_token: float
    per_supervised_token: float
    attention: float
    per_view: float

    def step_flops(self, tokens: float, squared_lengths: float, supervised: float, views: float) -> float:
        """FLOPs of a step from its counts; `squared_lengths` is the sum of its examples' squared lengths."""
        return (
            tokens * self.per_token
            + squared_lengths * self.attention
            + supervised * self.per_supervised_token
            + views * self.per_view
        )

    def per_token_at(self, seq_len: float, views_per_token: float = 0.0, supervised_fraction: float = 1.0) -> float:
        """FLOPs per token for examples of `seq_len` tokens, with the image views amortised over the tokens."""
        return (
            self.per_token
            + self.attention * seq_len
            + self.per_supervised_token * supervised_fraction
            + self.per_view * views_per_token
        )


def flops_model(
    counts: Mapping[str, tuple[int, int]],
    *,
    layers: int,
    hidden: int,
    llm_mode: str = "full",
    trained_layers: int = 0,
    tower_tokens: int = 0,
    image_tokens: int = 0,
) -> FlopsModel:
    """The FLOPs model of a LLaVA model from its parameter counts.

    A parameter costs 2 FLOPs per token it meets forward (a multiply and an add), 2 more
    backward for the gradient of its input, and 2 more for its own gradient. So per part:

    - 6N if its parameters train;
    - 4N if frozen but the gradient flows through it to a trained part below (the LLM when
      the projector or the tower trains; a LoRA LLM's base, since its adapters sit in every
      layer: base 4N + adapter 6N);
    - 2N if frozen at the input (a frozen tower runs without autograd; the frozen lower
      layers of a `partial` part when nothing below them trains).

    Attention (the score and value products, which have no parameters) costs 4 x hidden
    FLOPs per layer per token of context forward, 3x that when the backward passes through
    the layer: 12 x layers x hidden x s per token in the usual case (PaLM's count, causal
    masking not halved). The LLM runs every token (image placeholders included); its output
    head only the supervised ones. The tower runs per image view, not per text token: its N_v
    parameters meet `tower_tokens` tokens per view, the projector's N_p its `image_tokens`
    output tokens (exact for linear, mlp and pixel_shuffle; an approximation for the
    resampler and the convolutional projectors). The tower's own attention is left out: it
    adds 2 x depth x width x tokens / N_v per token, under a tenth for CLIP ViT-L/336.

    Args:
        counts: (trainable, all) parameters of `vision`, `projector`, `llm` (its body: without
            the input embeddings, a lookup that costs no FLOPs, and without the output head)
            and `head` (the output projection; absent: none).
        layers: decoder layers of the LLM.
        hidden: hidden size of the LLM.
        llm_mode: the LLM's freeze mode (`full`, `frozen`, `lora`, `partial`).
        trained_layers: decoder layers that train under `partial` (the last ones).
        tower_tokens: tokens the tower runs per view.
        image_tokens: tokens the projector makes of a view.
    """
    v_trained, v_all = counts.get("vision", (0, 0))
    p_trained, p_all = counts.get("projector", (0, 0))
    l_trained, l_all = counts["llm"]
    h_trained, h_all = counts.get("head", (0, 0))
    anything_trains = any(t > 0 for t, _ in counts.values())
    below_llm = v_trained > 0 or p_trained > 0
    vision = 6 * v_trained + 2 * (v_all - v_trained)  # nothing is below the tower
    projector = 6 * p_trained + (4 if v_trained else 2) * (p_all - p_trained)
    through = below_llm or llm_mode == "lora"
    body = 6 * l_trained + (4 if through else 2) * (l_all - l_trained)
    head = 6 * h_trained + (4 if anything_trains else 2) * (h_all - h_trained)  # above every other part
    if below_llm or llm_mode in ("full", "lora"):
        backward_layers = layers
    elif llm_mode == "partial":
        backward_layers = min(trained_layers, layers)
    else:
        backward_layers = 0
    attention = 4 * hidden * (layers + 2 * backward_layers)
    return FlopsModel(
        per_token=float(body),
        per_supervised_token=float(head),
        attention=float(attention),
        per_view=float(vision * tower_tokens + projector * image_tokens),
    )


def _numel(param: torch.Tensor) -> int:
    """Elements a parameter computes with: a 4-bit quantised weight stores two per byte."""
    state = getattr(param, "quant_state", None)
    return int(state.shape.numel()) if state is not None and hasattr(state, "shape") else param.numel()


def _count(params: Iterable[torch.Tensor]) -> tuple[int, int]:
    params = list(params)
    return sum(_numel(p) for p in params if p.requires_grad), sum(_numel(p) for p in params)


def flops_model_of(module: LightningModule) -> FlopsModel:
    """`flops_model` of an `LlavaLitModule` as built and frozen.

    Counts its parameters itself rather than through `parameter_counts()`: the input
    embeddings (a lookup), the output head (supervised tokens only) and the tower's
    parameters that never run must be told apart.
    """
    model = module.model
    llm = model.llm
    unused = {id(p) for p in getattr(model.vision, "unused_parameters", list)()}
    embedding = {id(p) for p in llm.get_input_embeddings().parameters()}
    head_module = llm.get_output_embeddings()
    head_params = list(head_module.parameters()) if head_module is not None else []
    head_ids = {id(p) for p in head_params}
    config = llm.config.get_text_config()
    freeze = module.freeze_config
    return flops_model(
        {
            "vision": _count(p for p in model.vision.parameters() if id(p) not in unused),
            "projector": _count(model.projector.parameters()),
            "llm": _count(p for p in llm.parameters() if id(p) not in embedding | head_ids),
            "head": _count(head_params),
        },
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        llm_mode=freeze.llm,
        trained_layers=freeze.llm_blocks,
        tower_tokens=model.vision.num_tokens,
        image_tokens=model.image_tokens,
    )


def flops_per_token(
    module: LightningModule, seq_len: float, views_per_token: float = 0.0, supervised_fraction: float = 1.0
) -> float:
    """Training FLOPs per token of an `LlavaLitModule` on examples of `seq_len` tokens (see `flops_model`)."""
    return flops_model_of(module).per_token_at(seq_len, views_per_token, supervised_fraction)


def mfu(flops: float, seconds: float, peak_flops: float, devices: int = 1) -> float:
    """Model FLOPs utilisation: the FLOPs the model needed over what the devices could do in the time."""
    return flops / (seconds * peak_flops * devices)


__all__ = [
    "PEAK_FLOPS",
    "FlopsModel",
    "chip_of",
    "flops_model",
    "flops_model_of",
    "flops_per_token",
    "mfu",
    "peak_flops_of",
]
