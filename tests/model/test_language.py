"""src.model.language: any causal LM from a config or a folder, attention
backends, gradient checkpointing and quantisation guards. Tiny models, nothing downloaded."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from src.model import language
from src.model.language import (
    LLMConfig,
    build_llm,
    lm_logits,
    padded_vocab,
    quantization_config,
    resolve_attention,
)
from src.model.llava import LlavaModel
from src.model.lora import LoraSettings
from src.model.projector import ProjectorConfig, build_projector
from src.model.vision import TimmVisionTower, VisionConfig

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[2]
DEMO_TOKENIZER = ROOT / "data_shards/demo/tokenizer"
TINY = dict(
    model_type="llama",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
LOWEST = torch.finfo(torch.float32).min


def tiny(**config) -> LLMConfig:
    return LLMConfig(config=TINY | config, attn_implementation="sdpa")


@pytest.fixture
def flash(monkeypatch):
    """Sets whether flash-attn and CUDA look available, as transformers' own check would say."""

    def set_(*, installed: bool, cuda: bool) -> None:
        monkeypatch.setattr(language.torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(language, "is_flash_attn_2_available", lambda: installed)

    return set_


# ---- tokenizer ------------------------------------------------------------------------
def test_vocab_comes_from_the_tokenizer_padded_to_64_and_padded_rows_are_never_predicted():
    model = build_llm(tiny(), vocab_size=93)
    assert padded_vocab(93) == 128 and padded_vocab(128) == 128 and padded_vocab(129) == 192
    assert model.get_input_embeddings().num_embeddings == 128
    assert model.get_output_embeddings().weight.shape == (128, 32)
    assert model.config.model_type == "llama" and model.config.hidden_size == 32
    assert model.config.num_hidden_layers == 1
    assert model.dtype == torch.float32
    with torch.no_grad():
        model.get_output_embeddings().weight[93:] = 100.0  # padded rows that would win every argmax
        logits = model(input_ids=torch.tensor([[1, 2, 92]])).logits
    assert logits.shape == (1, 3, 128)
    assert (logits[..., 93:] == LOWEST).all() and (logits[..., :93] > -1e4).all()
    assert (logits.argmax(-1) < 93).all()
    loss = torch.nn.functional.cross_entropy(logits[0], torch.tensor([3, 4, 5]))
    unpadded = torch.nn.functional.cross_entropy(logits[0, :, :93], torch.tensor([3, 4, 5]))
    assert torch.allclose(loss, unpadded)  # the padding does not change the loss


def test_a_smaller_config_vocab_grows_with_deterministic_mean_rows():
    model = build_llm(tiny(vocab_size=20), vocab_size=93)
    assert model.get_input_embeddings().num_embeddings == 128
    assert model.get_output_embeddings().weight.shape[0] == 128
    for table in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        assert torch.allclose(table[20:], table[:20].mean(0).expand(108, -1))
    logits = model(input_ids=torch.tensor([[1, 2, 92]])).logits
    assert (logits[..., 93:] == LOWEST).all()


def test_a_larger_config_vocab_is_kept_and_its_extra_rows_hidden():
    model = build_llm(tiny(vocab_size=150), vocab_size=93)
    assert model.get_input_embeddings().num_embeddings == 150
    logits = model(input_ids=torch.tensor([[1, 2]])).logits
    assert logits.shape[-1] == 150 and (logits[..., 93:] == LOWEST).all()


def test_an_exact_vocab_has_no_hook():
    model = build_llm(tiny(), vocab_size=128)
    assert not model.get_output_embeddings()._forward_hooks


# ---- config checks ---------------------------------------------------------------------
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


def test_inline_config_values_given_as_text_on_the_command_line_are_typed():
    fields = {"model_type": "llama", "hidden_size": "32", "intermediate_size": "64", "num_hidden_layers": "1",
              "num_attention_heads": "2", "num_key_value_heads": "2", "rms_norm_eps": "1e-5",
              "tie_word_embeddings": "false"}  # fmt: skip
    model = build_llm(LLMConfig(config=fields), vocab_size=50)
    assert model.config.hidden_size == 32 and isinstance(model.config.hidden_size, int)
    assert model.config.rms_norm_eps == pytest.approx(1e-5)
    assert model.config.tie_word_embeddings is False
    with pytest.raises(ValueError, match="expected true or false"):
        build_llm(LLMConfig(config={**fields, "tie_word_embeddings": "maybe"}), vocab_size=50)


def test_lora_settings_come_back_from_checkpoint_dicts():
    config = LLMConfig(**{"config": TINY, "lora": {"r": 8, "alpha": 16}})
    assert config.lora == LoraSettings(r=8, alpha=16)
    assert LLMConfig().lora == LoraSettings(r=128, alpha=256, dropout=0.05, target_modules="all-linear", bias="none")
    assert LLMConfig().trust_remote_code is False and LLMConfig().quantization == "none"


# ---- attention ---------------------------------------------------------------------------
def test_flash_attention_without_flash_attn_is_an_error(flash):
    flash(installed=False, cuda=True)
    with pytest.raises(
        ValueError, match=re.escape("attn_implementation flash_attention_2 needs flash-attn: pip install '.[flash]'")
    ):
        build_llm(LLMConfig(config=TINY, attn_implementation="flash_attention_2"), vocab_size=10)


def test_flash_attention_without_cuda_is_an_error(flash):
    flash(installed=True, cuda=False)
    with pytest.raises(ValueError, match=re.escape("flash_attention_2 needs a CUDA GPU; use sdpa or auto")):
        build_llm(LLMConfig(config=TINY, attn_implementation="flash_attention_2"), vocab_size=10)


@pytest.mark.parametrize("name", ["flash", "flash_attention_3", "SDPA", ""])
def test_unknown_attention_is_an_error(name):
    with pytest.raises(ValueError) as info:
        build_llm(LLMConfig(config=TINY, attn_implementation=name), vocab_size=10)
    assert (
        str(info.value)
        == f"unknown attn_implementation {name!r}; choose one of ['auto', 'flash_attention_2', 'flex_attention', 'sdpa', 'eager']"
    )


def test_auto_attention_is_flash_only_when_usable_on_cuda(flash):
    flash(installed=False, cuda=True)
    assert resolve_attention("auto") == "sdpa"
    assert resolve_attention("sdpa") == "sdpa" and resolve_attention("eager") == "eager"
    flash(installed=True, cuda=False)
    assert resolve_attention("auto") == "sdpa"
    flash(installed=True, cuda=True)
    assert resolve_attention("auto") == "flash_attention_2"
    assert resolve_attention("flash_attention_2") == "flash_attention_2"


def test_auto_attention_follows_what_the_model_supports(flash):
    flash(installed=False, cuda=False)
    gemma2 = language._model_class(AutoConfig.for_model("gemma2"))
    assert resolve_attention("auto", gemma2) == "eager"  # no sdpa: its attention soft-caps
    with pytest.raises(ValueError, match="Gemma2ForCausalLM does not support sdpa attention; use eager or auto"):
        resolve_attention("sdpa", gemma2)

    class ListsHubKernels:  # like granite_swa: flash_attention_2 would become a hub download
        _compatible_flash_implementations = ["kernels-community/vllm-flash-attn3"]

    flash(installed=True, cuda=True)
    assert resolve_attention("auto", ListsHubKernels) == "sdpa"
    with pytest.raises(ValueError, match="ListsHubKernels has no flash_attention_2 implementation of its own"):
        resolve_attention("flash_attention_2", ListsHubKernels)


def test_flex_attention_is_asked_for_by_name_only(flash):
    flash(installed=True, cuda=True)
    assert resolve_attention("flex_attention") == "flex_attention"
    assert resolve_attention("auto") == "flash_attention_2"  # never flex on its own
    model = build_llm(LLMConfig(config=TINY, attn_implementation="flex_attention"), vocab_size=10)
    assert model.config._attn_implementation == "flex_attention"

    class NoFlex:
        _supports_flex_attn = False

    with pytest.raises(ValueError, match="NoFlex does not support flex_attention; use sdpa or auto"):
        resolve_attention("flex_attention", NoFlex)


def test_packed_segments_are_the_blocks_transformers_finds():
    from transformers.masking_utils import find_packed_sequence_indices

    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])
    spans = language.packed_segments(positions)
    assert spans == [[(0, 3), (3, 5), (5, 6), (6, 8)], [(0, 6), (6, 8)], [(0, 8)]]
    ids = find_packed_sequence_indices(positions)
    for row, row_spans in enumerate(spans):
        assert [int(ids[row, start]) for start, _ in row_spans] == list(range(len(row_spans)))
        assert all(len(set(ids[row, a:b].tolist())) == 1 for a, b in row_spans)


@pytest.mark.parametrize("kv_heads", [4, 2])  # plain and grouped-query attention
def test_sdpa_by_example_equals_sdpa_under_the_block_diagonal_mask(kv_heads):
    """The per-example path against transformers' own SDPA with the mask transformers builds for the row."""
    from transformers import LlamaConfig
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import create_causal_mask

    g = torch.Generator().manual_seed(0)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]])
    query = torch.randn(2, 4, 10, 8, generator=g, requires_grad=True)
    key = torch.randn(2, kv_heads, 10, 8, generator=g, requires_grad=True)
    value = torch.randn(2, kv_heads, 10, 8, generator=g, requires_grad=True)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 4 // kv_heads, True
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=kv_heads)
    config._attn_implementation = "sdpa"
    mask = create_causal_mask(config, torch.zeros(2, 10, 32), None, None, position_ids=positions)
    assert mask is not None and not mask.all()  # a real block-diagonal mask
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    got, _ = language.sdpa_by_example(
        module, query, key, value, mask, scaling=0.3, packed_segments=language.packed_segments(positions)
    )
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(got.square().sum(), (query, key, value))
    expected_grads = torch.autograd.grad(expected.square().sum(), (query, key, value))
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # without the spans it is transformers' SDPA itself; with one span per row, examples would mix
    same, _ = language.sdpa_by_example(module, query, key, value, mask, scaling=0.3)
    assert torch.equal(same, expected)
    mixed, _ = language.sdpa_by_example(module, query, key, value, mask, scaling=0.3, packed_segments=[[(0, 10)]] * 2)
    assert (mixed - expected).abs().max() > 1e-2
    # a sliding window is in transformers' mask, not in the spans: its SDPA runs with that mask
    windowed, _ = language.sdpa_by_example(
        module, query, key, value, mask, scaling=0.3, packed_segments=[[(0, 10)]] * 2, sliding_window=3
    )
    assert torch.equal(windowed, expected)


def test_sdpa_is_built_as_sdpa_by_example(flash):
    flash(installed=False, cuda=False)
    model = build_llm(LLMConfig(config=TINY, attn_implementation="sdpa"), vocab_size=10)
    assert model.config._attn_implementation == language.SDPA_BY_EXAMPLE == "sdpa_by_example"


def test_the_chosen_backend_is_logged(caplog, flash):
    flash(installed=False, cuda=False)
    with caplog.at_level(logging.INFO):
        build_llm(LLMConfig(config=TINY), vocab_size=10)
    assert "llm attention: sdpa (attn_implementation: auto)" in caplog.text


# ---- loading from a folder or hub id -----------------------------------------------------
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A 'pretrained' tiny Llama saved like a hub repo, with a 100-token vocabulary."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("base")
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY, vocab_size=100)).save_pretrained(out)
    return out


def test_a_folder_loads_and_grows_the_same_way_every_time(base_dir):
    first = build_llm(LLMConfig(name=str(base_dir), attn_implementation="sdpa"), vocab_size=101)
    second = build_llm(LLMConfig(name=str(base_dir), attn_implementation="sdpa"), vocab_size=101)
    assert first.get_input_embeddings().num_embeddings == 128
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the new rows are means, not samples: an adapter's base rebuilds exactly


def test_trust_remote_code_reaches_config_and_model_loading_only_when_asked(base_dir, monkeypatch):
    seen = []
    for cls in (language.AutoConfig, language.AutoModelForCausalLM):
        real = cls.from_pretrained

        def spy(*args, _real=real, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    build_llm(LLMConfig(name=str(base_dir), attn_implementation="sdpa"), vocab_size=100)
    assert seen == [("AutoConfig", False), ("AutoModelForCausalLM", False)]
    seen.clear()
    build_llm(LLMConfig(name=str(base_dir), attn_implementation="sdpa", trust_remote_code=True), vocab_size=100)
    assert seen == [("AutoConfig", True), ("AutoModelForCausalLM", True)]


# ---- any causal LM, through LlavaModel's path ----------------------------------------------
FAMILIES = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16},
    "phi3": {},
}


@pytest.fixture(scope="module")
def vision_and_projector():
    vision = TimmVisionTower(
        VisionConfig(name="vit_tiny_patch16_224", image_size=32, kwargs=dict(patch_size=16, embed_dim=16, depth=2, num_heads=2))
    )  # fmt: skip
    return vision, build_projector(
        ProjectorConfig("linear"), vision.hidden_size, 32, vision.grid, vision.num_prefix_tokens
    )


@pytest.mark.parametrize("model_type", FAMILIES)
def test_each_family_builds_grows_and_runs_through_the_llava_path(model_type, vision_and_projector):
    torch.manual_seed(0)
    config = dict(TINY, model_type=model_type, num_hidden_layers=2, num_key_value_heads=1) | FAMILIES[model_type]
    llm = build_llm(LLMConfig(config=config), vocab_size=70).eval()
    assert llm.get_input_embeddings().num_embeddings == 128 == llm.get_output_embeddings().weight.shape[0]
    ids = torch.tensor([[1, 5, 9, 69, 3], [1, 7, 8, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    with torch.no_grad():
        reference = llm(input_ids=ids, attention_mask=mask).logits
        hidden = llm.get_decoder()(inputs_embeds=llm.get_input_embeddings()(ids), attention_mask=mask)
        ours = lm_logits(llm, hidden.last_hidden_state)
    assert torch.allclose(ours, reference, atol=1e-5)  # embeddings -> decoder -> head is the model's own forward
    assert (ours[..., 70:] <= ours[..., :70].min()).all()

    model = LlavaModel(*vision_and_projector, llm, image_token_id=69)
    ids = torch.tensor([[1, 5] + [69] * model.image_tokens + [9, 10, 11]])
    labels = torch.full_like(ids, -100)
    labels[0, -2:] = ids[0, -2:]
    out = model(ids, torch.ones_like(ids), torch.randn(1, 3, 32, 32), labels)
    assert out.hidden_states.shape == (1, ids.shape[1], 32) and torch.isfinite(out.loss)
    llm.zero_grad()
    out.loss.backward()
    matrices = [p for p in llm.get_decoder().layers[0].parameters() if p.ndim == 2]
    assert matrices and all(p.grad is not None and p.grad.abs().sum() > 0 for p in matrices)


def test_gemma2_logits_are_soft_capped_like_its_own_forward():
    llm = build_llm(LLMConfig(config=dict(TINY, model_type="gemma2", head_dim=16, final_logit_softcapping=0.05)), 70)
    assert llm.config._attn_implementation == "eager"
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        hidden = llm.get_decoder()(inputs_embeds=llm.get_input_embeddings()(ids)).last_hidden_state
        capped = lm_logits(llm, hidden)
        plain = llm.get_output_embeddings()(hidden)
    assert capped[..., :70].abs().max() <= 0.05 < plain[..., :70].abs().max()
    assert torch.allclose(capped, llm(input_ids=ids).logits, atol=1e-6)


# ---- gradient checkpointing --------------------------------------------------------------
def test_gradient_checkpointing_recomputes_layers_and_gives_the_same_gradients():
    config = dict(TINY, num_hidden_layers=2)
    grads, calls = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        llm = build_llm(LLMConfig(config=config, attn_implementation="sdpa", gradient_checkpointing=checkpointing), 64)
        layers = llm.get_decoder().layers
        assert all(layer.gradient_checkpointing == checkpointing for layer in layers)
        if checkpointing:
            assert layers[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}
        count = [0]
        layers[0].input_layernorm.register_forward_hook(lambda *_, count=count: count.__setitem__(0, count[0] + 1))
        llm.train()
        llm.get_input_embeddings().requires_grad_(False)  # as LlavaModel: embeddings come in from outside
        embeds = llm.get_input_embeddings()(torch.tensor([[1, 5, 9, 11, 3]]))
        hidden = llm.get_decoder()(inputs_embeds=embeds).last_hidden_state
        lm_logits(llm, hidden).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in llm.named_parameters() if p.requires_grad})
        calls.append(count[0])
    assert calls == [1, 2]  # the checkpointed layer ran again in backward
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


# ---- quantisation ------------------------------------------------------------------------
def test_quantization_errors_are_clear(monkeypatch):
    with pytest.raises(
        ValueError, match=re.escape("unknown llm.quantization '2bit'; choose one of ['none', '4bit', '8bit']")
    ):
        build_llm(LLMConfig(config=TINY, quantization="2bit"), vocab_size=10)
    with pytest.raises(ValueError, match="needs pretrained weights"):
        build_llm(LLMConfig(config=TINY, quantization="4bit"), vocab_size=10)
    monkeypatch.setattr(language.importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(ValueError, match=re.escape("llm.quantization 4bit needs bitsandbytes: pip install '.[qlora]'")):
        build_llm(LLMConfig(name="some/llm", quantization="4bit"), vocab_size=10)
    monkeypatch.setattr(language.importlib.util, "find_spec", lambda name, *a, **k: object())
    monkeypatch.setattr(language.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=re.escape("llm.quantization 8bit needs a CUDA GPU")):
        build_llm(LLMConfig(name="some/llm", quantization="8bit"), vocab_size=10)


def test_4bit_is_the_qlora_recipe():
    config = quantization_config(LLMConfig(quantization="4bit"))
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant and config.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config(LLMConfig(quantization="8bit")).load_in_8bit
    assert quantization_config(LLMConfig()) is None
