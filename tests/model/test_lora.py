"""src.model.lora: the adapter trains alone, runs inside LlavaModel's decoder calls, saves as a
standard peft folder that reloads to the same logits, and merges into a plain model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from src.model import lora
from src.model.language import LLMConfig, build_llm, lm_logits
from src.model.llava import LlavaModel
from src.model.lora import LoraSettings, apply_lora, merge_lora, save_lora_adapter

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(
    model_type="llama",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
VOCAB = 101  # the tokenizer's size: one more than the base's 100, so the base grows to 128 rows
IDS = torch.tensor([[1, 5, 9, 11, 3, 100], [1, 7, 8, 2, 4, 6]])
SETTINGS = LoraSettings(r=4, alpha=8, dropout=0.0)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A 'pretrained' tiny Llama saved like a hub repo."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("base")
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY, vocab_size=100)).save_pretrained(out)
    return out


def base(base_dir: Path) -> PreTrainedModel:
    return build_llm(LLMConfig(name=str(base_dir), attn_implementation="sdpa"), vocab_size=VOCAB).eval()


def trained(model: PeftModel) -> PeftModel:
    """LoRA B starts at zero (the adapter is a no-op); give every adapter weight a value."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


def llava_logits(llm: nn.Module) -> torch.Tensor:
    """LlavaModel's way through the LLM: embeddings in, decoder, head."""
    model = LlavaModel(nn.Identity(), nn.Identity(), llm, image_token_id=-1)
    with torch.no_grad():
        return lm_logits(llm, model(IDS, torch.ones_like(IDS)).hidden_states)


def test_only_the_adapter_trains_and_it_covers_every_linear_but_the_head(base_dir):
    plain = base(base_dir)
    linears = {name for name, module in plain.named_modules() if isinstance(module, nn.Linear)}
    llm = apply_lora(plain, LoraSettings())
    trainable = {name for name, p in llm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    wrapped = {
        name.removeprefix("base_model.model.") for name, module in llm.named_modules() if isinstance(module, LoraLayer)
    }
    assert wrapped == linears - {"lm_head"} and len(wrapped) == 2 * 7  # q k v o gate up down, per layer
    assert not llm.get_input_embeddings().weight.requires_grad
    assert not llm.get_output_embeddings().weight.requires_grad
    layer = llm.get_decoder().layers[0].self_attn.q_proj
    assert layer.r["default"] == 128 and layer.scaling["default"] == 2.0  # alpha 256 / r 128


def test_llava_decoder_calls_run_the_adapter(base_dir):
    plain = llava_logits(base(base_dir))
    llm = apply_lora(base(base_dir), SETTINGS).eval()
    assert torch.allclose(llava_logits(llm), plain)  # B = 0: the untrained adapter changes nothing
    trained(llm)
    ours = llava_logits(llm)
    assert not torch.allclose(ours, plain, atol=1e-3)
    with torch.no_grad():
        assert torch.allclose(ours, llm(input_ids=IDS).logits, atol=1e-5)  # same as peft's own forward
    assert (ours[..., VOCAB:] <= ours[..., :VOCAB].min()).all()  # padded rows stay hidden


def test_the_adapter_saves_as_a_peft_folder_and_reloads_to_the_same_logits(base_dir, tmp_path):
    llm = trained(apply_lora(base(base_dir), SETTINGS)).eval()
    holder = LlavaModel(nn.Identity(), nn.Identity(), llm, image_token_id=-1)
    out = save_lora_adapter(holder, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == str(base_dir)
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all("lora_A" in k or "lora_B" in k for k in weights)  # no embedding copies
    reloaded = PeftModel.from_pretrained(base(base_dir), out).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, llm(input_ids=IDS).logits)
    assert torch.equal(llava_logits(reloaded), llava_logits(llm))


def test_merging_gives_a_plain_model_with_the_same_logits(base_dir):
    llm = trained(apply_lora(base(base_dir), SETTINGS)).eval()
    before = llava_logits(llm)
    holder = LlavaModel(nn.Identity(), nn.Identity(), llm, image_token_id=-1)
    merged = merge_lora(holder)
    assert isinstance(merged, PreTrainedModel) and not isinstance(merged, PeftModel)
    assert holder.llm is merged
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    after = llava_logits(merged)
    assert torch.allclose(after, before, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=IDS).logits, before, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no LoRA adapter on this model"):
        merge_lora(holder)


def test_a_quantised_base_is_prepared_for_training_and_never_merged(base_dir, monkeypatch):
    prepared = []
    monkeypatch.setattr(lora, "prepare_model_for_kbit_training", lambda m, **k: prepared.append(k) or m)
    llm = base(base_dir)
    llm.is_loaded_in_4bit = True  # what bitsandbytes loading sets
    adapter = apply_lora(llm, SETTINGS)
    assert prepared == [{"use_gradient_checkpointing": False}]
    with pytest.raises(ValueError, match="merging LoRA into a quantised base loses the update"):
        merge_lora(adapter)


def test_gradient_checkpointing_under_lora_gives_the_same_adapter_gradients(base_dir):
    grads = []
    for checkpointing in (False, True):
        config = LLMConfig(name=str(base_dir), attn_implementation="sdpa", gradient_checkpointing=checkpointing)
        llm = trained(apply_lora(build_llm(config, vocab_size=VOCAB), SETTINGS)).train()
        model = LlavaModel(nn.Identity(), nn.Identity(), llm, image_token_id=-1)
        model(IDS, torch.ones_like(IDS), labels=IDS).loss.backward()
        grads.append({n: p.grad for n, p in llm.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name
