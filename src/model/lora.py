"""LoRA on the language model through peft, and the adapter's two ways out: saved, or merged.

The LLM is wrapped in place by `peft.get_peft_model`: its decoder layers get LoRA linears,
so `LlavaModel`'s `llm.get_decoder()` / `get_input_embeddings()` keep working through the
wrapper and run the adapter. The base, the embeddings and the output head stay frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import PreTrainedModel


@dataclass
class LoraSettings:
    r: int = 128
    """Rank of each low-rank update (LLaVA-1.5's LoRA recipe: 128)."""
    alpha: float = 256
    """Updates are scaled by alpha / r: 2 with the defaults, as in LLaVA-1.5."""
    dropout: float = 0.05
    """Dropout on the adapter's input while training."""
    target_modules: str | list[str] = "all-linear"
    """`all-linear`: every linear layer of the LLM except its output head; or module names (q_proj, v_proj, ...)."""
    bias: str = "none"
    """Which biases train besides the adapter: none, all or lora_only."""


def is_quantized(model: nn.Module) -> bool:
    """Loaded in 4 or 8 bit by bitsandbytes (the attributes peft itself reads)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def apply_lora(llm: PreTrainedModel, settings: LoraSettings) -> PeftModel:
    """Wraps the LLM with a trainable adapter; everything of the base is frozen.

    A quantised base first goes through peft's k-bit preparation (norms and other small
    parameters upcast to float32 so their gradients are stable). Gradient checkpointing
    is left as `build_llm` set it: here it would be switched on with reentrant autograd.
    """
    if is_quantized(llm):
        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias=settings.bias,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(llm, config)


def _holder_and_adapter(obj: nn.Module) -> tuple[nn.Module | None, PeftModel]:
    """The module whose `.llm` is the LoRA model (None when given the LoRA model itself)."""
    if isinstance(obj, PeftModel):
        return None, obj
    holder = obj if hasattr(obj, "llm") else getattr(obj, "model", None)  # a LlavaLitModule holds a LlavaModel
    llm = getattr(holder, "llm", None)
    if not isinstance(llm, PeftModel):
        raise ValueError("no LoRA adapter on this model: train with freeze.llm: lora")
    return holder, llm


def save_lora_adapter(obj: nn.Module, out_dir: str | Path) -> Path:
    """Writes the adapter as a standard peft folder (`adapter_config.json` + safetensors).

    `obj` is a LlavaLitModule, a LlavaModel or the peft model. The embeddings are not
    saved: they are frozen under LoRA and `build_llm` rebuilds them identically (new rows
    are deterministic means), so `PeftModel.from_pretrained(build_llm(...), out_dir)`
    restores the trained LLM; saving them would copy vocab x hidden x 2 weights and make
    peft look the base model up on the hub. A LlavaLitModule's tokenizer is saved too, so
    the folder says how large the vocabulary was. The projector is not in the adapter: it
    lives in the Lightning checkpoint.
    """
    _, adapter = _holder_and_adapter(obj)
    out = Path(out_dir)
    adapter.save_pretrained(out, save_embedding_layers=False)
    tokenizer = getattr(obj, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def merge_lora(obj: nn.Module) -> PreTrainedModel:
    """Folds the adapter into the base weights; returns the plain transformers model.

    In place: a LlavaModel (or a LlavaLitModule's) `.llm` becomes the merged model, so it
    can be exported or served without peft. A quantised base is refused: merging into 4
    or 8 bit weights rounds the update away; reload the base in bfloat16, attach the saved
    adapter with `PeftModel.from_pretrained`, and merge that.
    """
    holder, adapter = _holder_and_adapter(obj)
    if is_quantized(adapter.get_base_model()):
        raise ValueError(
            "merging LoRA into a quantised base loses the update: load the base unquantised, "
            "attach the saved adapter with PeftModel.from_pretrained, then merge"
        )
    merged = adapter.merge_and_unload(safe_merge=True)
    if holder is not None:
        holder.llm = merged
    return merged
