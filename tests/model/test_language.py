"""src.model.language: a causal LM from an inline config, with an explicit attention backend."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from src.model import language
from src.model.language import LLMConfig, build_llm, resolve_attention

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(
    model_type="llama",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny(**config) -> LLMConfig:
    return LLMConfig(config=TINY | config, attn_implementation="sdpa")


@pytest.fixture
def no_flash_attn(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        language.importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "flash_attn" else real(name, *a, **k),
    )


def test_vocab_size_comes_from_the_tokenizer():
    model = build_llm(tiny(), vocab_size=93)
    assert model.get_input_embeddings().num_embeddings == 93
    assert model.get_output_embeddings().weight.shape == (93, 32)
    assert model.config.model_type == "llama" and model.config.hidden_size == 32
    assert model.config.num_hidden_layers == 1
    assert model.dtype == torch.float32
    logits = model(input_ids=torch.tensor([[1, 2, 92]])).logits
    assert logits.shape == (1, 3, 93)


def test_a_smaller_config_vocab_is_grown_to_the_tokenizer():
    model = build_llm(tiny(vocab_size=20), vocab_size=93)
    assert model.get_input_embeddings().num_embeddings == 93
    assert model.get_output_embeddings().weight.shape[0] == 93


def test_a_larger_config_vocab_is_kept():
    model = build_llm(tiny(vocab_size=128), vocab_size=93)
    assert model.get_input_embeddings().num_embeddings == 128


def test_unknown_config_keys_are_named():
    with pytest.raises(ValueError) as info:
        build_llm(tiny(hiden_size=64, zzz=1), vocab_size=10)
    assert str(info.value) == "llm.config has keys that llama configs do not know: ['hiden_size', 'zzz']"


def test_model_type_is_required():
    config = LLMConfig(config={k: v for k, v in TINY.items() if k != "model_type"}, attn_implementation="sdpa")
    with pytest.raises(
        ValueError, match=re.escape("llm.config needs a model_type (e.g. llama) when llm.name is not set")
    ):
        build_llm(config, vocab_size=10)


def test_unknown_dtype():
    with pytest.raises(
        ValueError, match=re.escape("unknown dtype 'fp8'; choose one of ['float32', 'bfloat16', 'float16']")
    ):
        build_llm(LLMConfig(config=TINY, dtype="fp8"), vocab_size=10)


def test_dtype_and_attention_are_applied():
    model = build_llm(LLMConfig(config=TINY, attn_implementation="eager", dtype="bfloat16"), vocab_size=10)
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"


def test_flash_attention_without_flash_attn_is_an_error(no_flash_attn):
    with pytest.raises(
        ValueError, match=re.escape("attn_implementation flash_attention_2 needs flash-attn: pip install '.[flash]'")
    ):
        build_llm(LLMConfig(config=TINY, attn_implementation="flash_attention_2"), vocab_size=10)


@pytest.mark.parametrize("name", ["flash", "flash_attention_3", "SDPA", ""])
def test_unknown_attention_is_an_error(name):
    with pytest.raises(ValueError) as info:
        build_llm(LLMConfig(config=TINY, attn_implementation=name), vocab_size=10)
    assert (
        str(info.value)
        == f"unknown attn_implementation {name!r}; choose one of ['auto', 'flash_attention_2', 'sdpa', 'eager']"
    )


def test_auto_attention_without_flash_attn_is_sdpa(no_flash_attn):
    assert resolve_attention("auto") == "sdpa"
    assert resolve_attention("sdpa") == "sdpa" and resolve_attention("eager") == "eager"
    model = build_llm(LLMConfig(config=TINY), vocab_size=10)
    assert model.config._attn_implementation == "sdpa"


def test_auto_attention_with_flash_attn_needs_cuda(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        language.importlib.util,
        "find_spec",
        lambda name, *a, **k: object() if name == "flash_attn" else real(name, *a, **k),
    )
    monkeypatch.setattr(language.torch.cuda, "is_available", lambda: False)
    assert resolve_attention("auto") == "sdpa"
    monkeypatch.setattr(language.torch.cuda, "is_available", lambda: True)
    assert resolve_attention("auto") == "flash_attention_2"
    assert resolve_attention("flash_attention_2") == "flash_attention_2"


def test_inline_config_values_given_as_text_on_the_command_line_are_typed():
    from src.model.language import LLMConfig, build_llm

    fields = {"model_type": "llama", "hidden_size": "32", "intermediate_size": "64", "num_hidden_layers": "1",
              "num_attention_heads": "2", "num_key_value_heads": "2", "rms_norm_eps": "1e-5",
              "tie_word_embeddings": "false"}  # fmt: skip
    model = build_llm(LLMConfig(config=fields), vocab_size=50)
    assert model.config.hidden_size == 32 and isinstance(model.config.hidden_size, int)
    assert model.config.rms_norm_eps == pytest.approx(1e-5)
    assert model.config.tie_word_embeddings is False
    with pytest.raises(ValueError, match="expected true or false"):
        build_llm(LLMConfig(config={**fields, "tie_word_embeddings": "maybe"}), vocab_size=50)
