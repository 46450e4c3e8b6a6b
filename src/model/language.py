"""The language model: any `AutoModelForCausalLM`, from a hub id or an inline config.

The attention backend is chosen explicitly: transformers 5 fetches a flash-attention
kernel from the hub (the `kernels` package) when `flash_attention_2` is asked for and
flash-attn is missing, which fails offline and runs unreviewed code online. So we only ask
for `flash_attention_2` when transformers' own check finds flash-attn usable, and `auto`
means flash-attn when usable, else PyTorch SDPA (else eager, for models without SDPA).

Packed (padding-free) batches work with every backend, each example attending only to
itself: transformers builds the per-example causal mask from the restarting `position_ids`
(`masking_utils.find_packed_sequence_indices`): a dense block-diagonal mask for `eager` (the
row is computed whole, length squared whatever it holds), a FlexAttention `BlockMask` for
`flex_attention` (blocks across examples are skipped; torch.compile'd by transformers, CUDA
for training: FlexAttention has no backward on a CPU), and `LlavaModel` hands flash attention
the examples' boundaries (varlen). `sdpa` is transformers' SDPA registered under the name
`sdpa_by_example` with one addition: handed a packed row's example boundaries
(`packed_segments`, which only `LlavaModel` passes), it runs SDPA once per example with
`is_causal` instead of once per row under the dense block-diagonal mask, so a packed row
costs the sum of its examples' squares, not the row's square. Everything else (padded
batches, generation with a cache) is transformers' SDPA with transformers' masks, unchanged.
`auto` never picks `flex_attention`: its compilation, and recompilation for each new row
length, is only worth it where the GPU check measured it.

The vocabulary is the tokenizer's: embeddings grow to cover it, rounded up to a multiple of
64 rows (tensor-core friendly shapes). The extra rows, and any rows a hub model has beyond
its tokenizer, are never produced by the data; a hook on the output head gives them the
lowest logit, so no greedy step or candidate score can pick one and the loss is the same as
without them.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface
from transformers.utils import is_flash_attn_2_available

from src.core.constants import DTYPES
from src.model.hf_config import inline_fields
from src.model.lora import LoraSettings

ATTENTION_BACKENDS = ("auto", "flash_attention_2", "flex_attention", "sdpa", "eager")
QUANTIZATIONS = ("none", "4bit", "8bit")
PAD_TO_MULTIPLE_OF = 64
TOKEN_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")


@dataclass
class LLMConfig:
    name: str | None = None
    """Hub id or local folder of a causal LM (e.g. `lmsys/vicuna-7b-v1.5`); None uses `config`."""
    config: dict = field(default_factory=dict)
    """Inline config for a randomly initialised model: `model_type` plus its fields."""
    attn_implementation: str = "auto"
    """`auto` (flash_attention_2 if installed with CUDA, else sdpa), `flash_attention_2`, `flex_attention`
    (FlexAttention: packed rows skip the blocks across examples; training needs CUDA), `sdpa` or `eager`."""
    dtype: str = "float32"
    """Parameter dtype: float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Run modelling/tokenizer code shipped with the hub repo (only for repos you trust)."""
    gradient_checkpointing: bool = False
    """Recompute decoder layers in backward (non-reentrant): far less activation memory, ~30% more compute."""
    quantization: str = "none"
    """`none`, `4bit` (QLoRA: nf4, double quantisation, bf16 compute) or `8bit`; needs bitsandbytes and CUDA."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """The adapter trained when `freeze.llm` is `lora`."""

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):  # from a checkpoint's hyperparameters
            self.lora = LoraSettings(**self.lora)


SDPA_BY_EXAMPLE = "sdpa_by_example"
"""The transformers attention name `sdpa` is built under: SDPA, one example at a time in packed rows."""

Segments = list[list[tuple[int, int]]]


def packed_segments(position_ids: torch.Tensor) -> Segments:
    """Each row's (start, end) spans, one per example: a new one wherever positions do not go up by one.

    The rule of transformers' `find_packed_sequence_indices`, so the spans are exactly the blocks
    of the causal mask it would build; a padding tail that restarts at 0 is a span of its own.
    One host sync per forward (transformers' flash path syncs once per layer for the same).
    """
    rows, length = position_ids.shape
    breaks = (position_ids[:, 1:] != position_ids[:, :-1] + 1).nonzero().tolist()
    starts: list[list[int]] = [[0] for _ in range(rows)]
    for row, index in breaks:
        starts[row].append(index + 1)
    return [list(zip(row, row[1:] + [length], strict=True)) for row in starts]


def sdpa_by_example(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_segments: Segments | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA; given `packed_segments`, causal SDPA over each example of each row instead.

    The dense block-diagonal mask computes every (query, key) pair of a row, length squared,
    most of them masked; per example, SDPA gets `is_causal` (no mask at all), which its flash and
    memory-efficient kernels (and the CPU's) run at half of an example's square. The result is
    the same attention: the mask transformers built is exactly these blocks (`packed_segments`).
    """
    # a sliding window, soft-capping or attention sinks live in transformers' mask or kernel call: theirs
    special = any(kwargs.get(name) is not None for name in ("sliding_window", "softcap", "s_aux"))
    if packed_segments is None or special or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    return _attend_by_example(query, key, value, getattr(module, "num_key_value_groups", 1), dropout, scaling,
                              packed_segments), None  # fmt: skip


@torch.compiler.disable  # a graph break: compiled decoder layers are not recompiled for each packing layout
def _attend_by_example(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, groups: int, dropout: float,
    scaling: float | None, packed_segments: Segments,
) -> torch.Tensor:  # fmt: skip
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)

    def attend(row: int, start: int, end: int) -> torch.Tensor:
        q, k, v = (t[row : row + 1, :, start:end] for t in (query, key, value))
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)

    rows = [torch.cat([attend(row, *span) for span in spans], dim=2) for row, spans in enumerate(packed_segments)]
    return torch.cat(rows).transpose(1, 2).contiguous()


AttentionInterface.register(SDPA_BY_EXAMPLE, sdpa_by_example)
AttentionMaskInterface.register(SDPA_BY_EXAMPLE, sdpa_mask)  # transformers' SDPA masks everywhere else


def _model_class(hf_config: PretrainedConfig) -> type[PreTrainedModel] | None:
    """The class AutoModelForCausalLM picks; None for remote code, whose class the repo decides."""
    try:
        return AutoModelForCausalLM._model_mapping[type(hf_config)]
    except (KeyError, ValueError):
        return None


def _flash_attn_usable() -> bool:
    """transformers' own test (flash-attn >= 2.3.3 and a CUDA device), without its hub-kernel fallback.

    When it holds, transformers never reaches for the `kernels` package; when it does not,
    we never ask for flash_attention_2.
    """
    return torch.cuda.is_available() and is_flash_attn_2_available()


def resolve_attention(requested: str, model_class: type | None = None) -> str:
    """The backend to ask transformers for; `model_class` (when known) says what it supports."""
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attn_implementation {requested!r}; choose one of {list(ATTENTION_BACKENDS)}")
    name = "the model" if model_class is None else model_class.__name__
    supports_flash = getattr(model_class, "_supports_flash_attn", True)
    supports_sdpa = getattr(model_class, "_supports_sdpa", True)
    # a model listing its own flash implementations would swap flash_attention_2 for a hub kernel
    listed = getattr(model_class, "_compatible_flash_implementations", None)
    if listed is not None and "flash_attention_2" not in listed:
        supports_flash = False
    if requested == "auto":
        if _flash_attn_usable() and supports_flash:
            return "flash_attention_2"
        return "sdpa" if supports_sdpa else "eager"
    if requested == "flash_attention_2":
        if not torch.cuda.is_available():
            raise ValueError("attn_implementation flash_attention_2 needs a CUDA GPU; use sdpa or auto")
        if not _flash_attn_usable():
            raise ValueError("attn_implementation flash_attention_2 needs flash-attn: pip install '.[flash]'")
        if not supports_flash:
            raise ValueError(f"{name} has no flash_attention_2 implementation of its own; use sdpa or auto")
    if requested == "sdpa" and not supports_sdpa:
        raise ValueError(f"{name} does not support sdpa attention; use eager or auto")
    if requested == "flex_attention" and not getattr(model_class, "_supports_flex_attn", True):
        raise ValueError(f"{name} does not support flex_attention; use sdpa or auto")
    return requested


def check_quantization(config: LLMConfig) -> None:
    """Fails early (before data or weights load) when quantisation cannot work here."""
    if config.quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown llm.quantization {config.quantization!r}; choose one of {list(QUANTIZATIONS)}")
    if config.quantization == "none":
        return
    if config.name is None:
        raise ValueError("llm.quantization needs pretrained weights (llm.name); an inline config starts random")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"llm.quantization {config.quantization} needs bitsandbytes: pip install '.[qlora]'")
    if not torch.cuda.is_available():
        raise ValueError(f"llm.quantization {config.quantization} needs a CUDA GPU (bitsandbytes kernels)")


def quantization_config(config: LLMConfig) -> BitsAndBytesConfig | None:
    """QLoRA's recipe for 4 bit: nf4 weights, quantised quantisation constants, bf16 matmuls."""
    if config.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    if config.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def padded_vocab(vocab_size: int) -> int:
    """Rows that cover `vocab_size` tokens, rounded up to a multiple of 64."""
    return math.ceil(vocab_size / PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF


def _inline_config(config: LLMConfig, vocab_size: int) -> PretrainedConfig:
    fields = dict(config.config)
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise ValueError("llm.config needs a model_type (e.g. llama) when llm.name is not set")
    fields, known = inline_fields(model_type, fields, "llm.config")
    fields.setdefault("vocab_size", padded_vocab(vocab_size))
    for key in TOKEN_ID_FIELDS:
        # defaults sized for the original vocabulary (phi3: pad 32000) would not fit a small one
        default = known.get(key)
        if key not in fields and isinstance(default, int) and default >= fields["vocab_size"]:
            fields[key] = None
    return AutoConfig.for_model(model_type, **fields)


@torch.no_grad()
def _grow_vocab(model: PreTrainedModel, vocab_size: int) -> None:
    """Resizes to cover `vocab_size` (multiple of 64); new rows are the mean of the old ones.

    The mean (what transformers' mean_resizing samples around, without its noise) keeps the
    new tokens' logits ordinary and is deterministic, so rebuilding the base for a saved
    LoRA adapter reproduces these rows exactly.
    """
    old = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(vocab_size, pad_to_multiple_of=PAD_TO_MULTIPLE_OF, mean_resizing=False)
    tensors = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None:
        tensors += [head.weight] + ([head.bias] if getattr(head, "bias", None) is not None else [])
    for tensor in {id(t): t for t in tensors}.values():  # tied weights once
        tensor[old:] = tensor[:old].float().mean(0).to(tensor.dtype)


class HideRowsBeyond:
    """Forward hook on the output head: rows >= `size` get the dtype's lowest logit."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if output.shape[-1] <= self.size:
            return None
        beyond = torch.arange(output.shape[-1], device=output.device) >= self.size
        return output.masked_fill(beyond, torch.finfo(output.dtype).min)


def lm_logits(llm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits of decoder hidden states, as the causal LM's own forward makes them.

    `get_output_embeddings()` alone is not enough for every model: Gemma 2 (and Gemma 3
    when configured) soft-caps its final logits in the causal-LM forward, after the head.
    Soft-capped rows beyond the tokenizer sit at -cap, the floor no real token reaches.
    """
    logits = llm.get_output_embeddings()(hidden)
    cap = getattr(llm.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def build_llm(config: LLMConfig, vocab_size: int) -> PreTrainedModel:
    """Builds the LLM for a tokenizer of `vocab_size` tokens (see the module docstring)."""
    if config.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {config.dtype!r}; choose one of {list(DTYPES)}")
    check_quantization(config)
    dtype = DTYPES[config.dtype]
    if config.name is not None:
        hf_config = AutoConfig.from_pretrained(config.name, trust_remote_code=config.trust_remote_code)
    else:
        hf_config = _inline_config(config, vocab_size)
    attention = resolve_attention(config.attn_implementation, _model_class(hf_config))
    rank_zero_info(f"llm attention: {attention} (attn_implementation: {config.attn_implementation})")
    if config.name is not None:
        quantization = quantization_config(config)
        placement = {"device_map": {"": torch.cuda.current_device()}} if quantization is not None else {}
        model = AutoModelForCausalLM.from_pretrained(
            config.name,
            config=hf_config,
            attn_implementation=attention,
            dtype=dtype,
            trust_remote_code=config.trust_remote_code,
            quantization_config=quantization,
            **placement,
        )
    else:
        model = AutoModelForCausalLM.from_config(
            hf_config, attn_implementation=attention, dtype=dtype, trust_remote_code=config.trust_remote_code
        )
    if model.config._attn_implementation != attention:  # e.g. remote code choosing on its own
        raise ValueError(f"asked for {attention} attention, the model set up {model.config._attn_implementation}")
    if attention == "sdpa":
        model.set_attn_implementation(SDPA_BY_EXAMPLE)
    if model.get_input_embeddings().num_embeddings < vocab_size:
        _grow_vocab(model, vocab_size)
    if model.get_output_embeddings().weight.shape[0] > vocab_size:
        model.get_output_embeddings().register_forward_hook(HideRowsBeyond(vocab_size))
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model
