"""The language model: any `AutoModelForCausalLM`, from a hub id or an inline config.

The attention backend is chosen explicitly: transformers 5 tries to download a hub kernel
for `flash_attention_2` when flash-attn is missing, which fails offline; so `auto` means
flash-attn when it is importable, else PyTorch SDPA.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

ATTENTION_BACKENDS = ("auto", "flash_attention_2", "sdpa", "eager")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LLMConfig:
    name: str | None = None
    """Hub id or local folder of a causal LM (e.g. `lmsys/vicuna-7b-v1.5`); None uses `config`."""
    config: dict = field(default_factory=dict)
    """Inline config for a randomly initialised model: `model_type` plus its fields."""
    attn_implementation: str = "auto"
    """`auto` (flash_attention_2 if installed, else sdpa), `flash_attention_2`, `sdpa` or `eager`."""
    dtype: str = "float32"
    """Parameter dtype: float32, bfloat16 or float16."""


def resolve_attention(requested: str) -> str:
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attn_implementation {requested!r}; choose one of {list(ATTENTION_BACKENDS)}")
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if has_flash and torch.cuda.is_available() else "sdpa"
    if requested == "flash_attention_2" and not has_flash:
        raise ValueError("attn_implementation flash_attention_2 needs flash-attn: pip install '.[flash]'")
    return requested


def _coerce(value: object, default: object) -> object:
    """Values set on the command line (`--model.llm.config.hidden_size 256`) arrive as text."""
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        return value
    if isinstance(default, bool):
        if value.lower() not in ("true", "false"):
            raise ValueError(f"expected true or false, got {value!r}")
        return value.lower() == "true"
    if isinstance(default, (int, float)):
        number = float(value)
        return int(number) if isinstance(default, int) and number.is_integer() else number
    return value


def build_llm(config: LLMConfig, vocab_size: int) -> PreTrainedModel:
    """Builds the LLM; grows its embeddings when the tokenizer has more tokens (`<image>`)."""
    if config.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {config.dtype!r}; choose one of {list(DTYPES)}")
    attention = resolve_attention(config.attn_implementation)
    dtype = DTYPES[config.dtype]
    if config.name is not None:
        model = AutoModelForCausalLM.from_pretrained(config.name, attn_implementation=attention, dtype=dtype)
    else:
        fields = dict(config.config)
        model_type = fields.pop("model_type", None)
        if model_type is None:
            raise ValueError("llm.config needs a model_type (e.g. llama) when llm.name is not set")
        fields.setdefault("vocab_size", vocab_size)
        known = AutoConfig.for_model(model_type).to_dict()
        unknown = sorted(set(fields) - set(known))
        if unknown:
            raise ValueError(f"llm.config has keys that {model_type} configs do not know: {unknown}")
        fields = {key: _coerce(value, known[key]) for key, value in fields.items()}
        hf_config = AutoConfig.for_model(model_type, **fields)
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=attention, dtype=dtype)
    if model.get_input_embeddings().num_embeddings < vocab_size:
        model.resize_token_embeddings(vocab_size)
    return model
