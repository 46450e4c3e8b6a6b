"""src.model.generation: left-padded, KV-cached batched decoding against one-by-one full recomputes.

The model is a tiny LLaVA over the demo tokenizer (so replies decode to words and stop
strings can be tested for real); prompts of different lengths, with two images, one image
or none, are mixed in one batch.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llava_model

from src.model.generation import (
    GenerationConfig,
    StopStrings,
    choose_tokens,
    decode_reply,
    generate,
    left_pad,
    positions_of,
    row_generators,
    row_seed,
)
from src.model.llava import LlavaModel

pytestmark = pytest.mark.usefixtures("single_thread")

T = 4  # tokens per image


@pytest.fixture(scope="module")
def vocab(tokenizer) -> int:
    return len(tokenizer)


@pytest.fixture(scope="module")
def img(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<image>")


LLMS = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    # learned absolute positions: unlike RoPE, a shifted position changes the result
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=128, tie_word_embeddings=False),
}  # fmt: skip


def build_model(vocab: int, img: int, attn: str = "sdpa", arch: str = "llama") -> LlavaModel:
    return tiny_llava_model(LLMS[arch], vocab, img, attn)


@pytest.fixture(scope="module", params=list(LLMS))
def model(request, vocab, img) -> LlavaModel:
    return build_model(vocab, img, arch=request.param)


@pytest.fixture(scope="module")
def llama(vocab, img) -> LlavaModel:
    return build_model(vocab, img)


@pytest.fixture(scope="module")
def prompts(img) -> list[list[int]]:
    """Five prompts of lengths 3 to 19: two images, none, one, none, one image at the end."""
    return [
        [2, 40, *[img] * T, 41, *[img] * T, 42, 43, 44, 45, 46, 47],
        [2, 50, 51],
        [2, *[img] * T, 52, 53, 54, 55, 56, 57, 58, 59],
        [2, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70],
        [2, 71, 72, *[img] * T],
    ]


@pytest.fixture(scope="module")
def images(prompts, img) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(3)
    out = []
    for p in prompts:
        n = p.count(img) // T
        out.append(torch.randn(n, 3, 32, 32, generator=g) if n else None)
    return out


def right_padded(prompts: list[list[int]], tail: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (with `tail` junk tokens after each prompt, as in a training batch) and lengths."""
    width = max(map(len, prompts)) + tail
    ids = torch.full((len(prompts), width), 0, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, : len(p)] = torch.tensor(p)
        ids[row, len(p) : len(p) + tail] = 77
    return ids, torch.tensor([len(p) for p in prompts])


def stacked(images: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [x for x in images if x is not None]
    return torch.cat(present) if present else None


def batched(model, prompts, images, steps, eos, **kwargs):
    ids, lengths = right_padded(prompts, tail=2)
    return generate(model, ids, lengths, stacked(images), steps, eos, **kwargs)


def one(model, prompt, image, steps, eos, **kwargs):
    ids, lengths = right_padded([prompt])
    return generate(model, ids, lengths, image, steps, eos, **kwargs)[0]


NEVER = 10_000  # an eos id that never comes


# ---- greedy ------------------------------------------------------------------------------


def test_batched_greedy_equals_unbatched_and_a_full_recompute(model, prompts, images, greedy_reference):
    with torch.no_grad():
        got = batched(model, prompts, images, 8, NEVER)
        alone = [one(model, p, x, 8, NEVER) for p, x in zip(prompts, images, strict=True)]
        reference = [greedy_reference(model, p, x, 8, NEVER) for p, x in zip(prompts, images, strict=True)]
    assert [g.tokens for g in got] == [a.tokens for a in alone] == reference
    assert all(len(g.tokens) == 8 and g.finish == "length" for g in got)
    assert len({tuple(r) for r in reference}) == len(prompts)  # the rows really differ


def test_batch_order_and_company_do_not_change_a_row(model, prompts, images, greedy_reference):
    order = [3, 0, 4, 1, 2]
    with torch.no_grad():
        got = batched(model, [prompts[i] for i in order], [images[i] for i in order], 6, NEVER)
        pair = batched(model, [prompts[1], prompts[0]], [images[1], images[0]], 6, NEVER)
        reference = [greedy_reference(model, p, x, 6, NEVER) for p, x in zip(prompts, images, strict=True)]
    assert [g.tokens for g in got] == [reference[i] for i in order]
    assert [g.tokens for g in pair] == [reference[1], reference[0]]


def test_positions_restart_at_each_rows_first_token(model, prompts, images):
    """The check has teeth where positions are absolute (GPT-2): positions counted from the padded
    left edge change the result. RoPE (Llama) only sees relative positions, so a shift is harmless."""
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert positions_of(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]
    ids, lengths = right_padded(prompts)
    with torch.no_grad():
        embeds, mask = left_pad(model.embed(ids, stacked(images)), lengths)
        decoder = model.llm.get_decoder()
        right = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_of(mask)).last_hidden_state
        naive = decoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state  # 0..width-1 for every row
        alone = model(torch.tensor([prompts[1]]), None, None).hidden_states[0, -1]
    torch.testing.assert_close(right[1, -1], alone, atol=1e-5, rtol=0)
    shifted = (naive[1, -1] - alone).abs().max()
    assert shifted > 1e-2 if model.llm.config.model_type == "gpt2" else shifted < 1e-5


def test_left_pad_moves_each_prompt_to_the_right_edge():
    embeddings = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1) + 1
    moved, mask = left_pad(embeddings, torch.tensor([2, 3]))
    assert moved[..., 0].tolist() == [[0.0, 1.0, 2.0], [5.0, 6.0, 7.0]]
    assert mask.tolist() == [[0, 1, 1], [1, 1, 1]]


def test_each_row_stops_at_eos_and_leaves_the_batch(model, prompts, images, greedy_reference):
    with torch.no_grad():
        free = [greedy_reference(model, p, x, 6, NEVER) for p, x in zip(prompts, images, strict=True)]
        k = next(k for k in range(1, 6) if free[1][k] not in free[1][:k])  # a token row 1 first says at step k
        eos = free[1][k]
        expected = [greedy_reference(model, p, x, 6, eos) for p, x in zip(prompts, images, strict=True)]
        sizes: list[int] = []
        hook = model.llm.get_decoder().register_forward_pre_hook(
            lambda m, a, kw: sizes.append(kw["inputs_embeds"].shape[0]), with_kwargs=True
        )
        try:
            got = batched(model, prompts, images, 6, [NEVER, eos])
        finally:
            hook.remove()
    assert [g.tokens for g in got] == expected
    assert got[1].finish == "eos" and got[1].tokens == free[1][:k]
    assert all(g.finish == ("eos" if eos in f else "length") for g, f in zip(got, free, strict=True))
    assert sizes[0] == 5 and sizes[-1] < 5 and sizes == sorted(sizes, reverse=True)  # finished rows dropped


def test_a_rank_done_early_keeps_stepping_when_others_are_not(llama, prompts, images):
    """all_done: under FSDP every rank makes the same decoder calls; a rank done early keeps stepping
    (its outputs ignored) until the others are done, and its replies are unchanged."""
    model = llama
    with torch.no_grad():
        free = one(model, prompts[1], images[1], 6, NEVER)
        k = next(k for k in range(1, 6) if free.tokens[k] not in free.tokens[:k])
        eos = free.tokens[k]  # this rank's only row ends after k tokens
        calls: list[bool] = []

        def others_need_five_steps(local_done: bool) -> bool:  # what an all-reduce over ranks would say
            calls.append(local_done)
            return local_done and len(calls) >= 5

        decoder_calls: list[int] = []
        hook = model.llm.get_decoder().register_forward_pre_hook(lambda m, a: decoder_calls.append(1))
        try:
            got = one(model, prompts[1], images[1], 6, eos, all_done=others_need_five_steps)
        finally:
            hook.remove()
    assert got.tokens == free.tokens[:k] and got.finish == "eos"
    assert calls == [False] * k + [True] * (5 - k)
    assert len(decoder_calls) == 5  # the prefill and four steps, as many as the other ranks make


def test_zero_new_tokens():
    assert generate(None, torch.zeros(2, 3, dtype=torch.long), torch.tensor([3, 2]), None, 0, 1)[1].tokens == []


# ---- sampling ----------------------------------------------------------------------------


def test_sampling_is_reproducible_and_independent_of_the_batch(model, prompts, images):
    ids = ["a", "b", "c", "d", "e"]
    settings = dict(temperature=1.5, top_p=0.95)
    with torch.no_grad():
        first = batched(model, prompts, images, 8, NEVER, generators=row_generators(7, ids, "cpu"), **settings)
        again = batched(model, prompts, images, 8, NEVER, generators=row_generators(7, ids, "cpu"), **settings)
        alone = [
            one(model, p, x, 8, NEVER, generators=row_generators(7, [i], "cpu"), **settings)
            for p, x, i in zip(prompts, images, ids, strict=True)
        ]
        other_seed = batched(model, prompts, images, 8, NEVER, generators=row_generators(8, ids, "cpu"), **settings)
        greedy = batched(model, prompts, images, 8, NEVER)
    assert [g.tokens for g in first] == [g.tokens for g in again] == [a.tokens for a in alone]
    assert [g.tokens for g in first] != [g.tokens for g in other_seed]
    assert [g.tokens for g in first] != [g.tokens for g in greedy]


def test_sampling_without_generators_is_refused(llama, prompts, images):
    model = llama
    with pytest.raises(ValueError, match="sampling needs one generator per row"):
        batched(model, prompts, images, 2, NEVER, temperature=1.0)


def test_row_seeds_are_stable_and_distinct():
    assert row_seed(0, "x") == 6954302760706977299  # the same in every process and Python run
    assert len({row_seed(s, i) for s in range(3) for i in ("a", "b", 1, "1a")}) == 12
    assert all(0 <= row_seed(s, "a") < 2**63 for s in range(5))


def test_draws_follow_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    gens = row_generators(0, ["z"], "cpu")
    draws = torch.stack([choose_tokens(logits, 1.0, 1.0, gens) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.softmax(logits[0], 0), atol=0.03, rtol=0)


def test_top_p_keeps_only_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    gens = row_generators(1, ["z"], "cpu")
    draws = torch.stack([choose_tokens(logits, 1.0, 0.7, gens) for _ in range(3000)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / 3000
    assert freq[2] == 0 and freq[3] == 0  # 0.5 + 0.3 already reach 0.7
    assert abs(freq[0] - 0.5 / 0.8) < 0.03
    only_top = torch.stack([choose_tokens(logits, 1.0, 0.5, gens) for _ in range(200)])
    assert only_top.unique().tolist() == [0]


# ---- stop strings ------------------------------------------------------------------------


def test_a_stop_string_ends_the_row_and_is_cut_from_the_answer(model, prompts, images, tokenizer):
    with torch.no_grad():
        free = batched(model, prompts, images, 8, NEVER)
    # a stop word that row 0 first says at its k-th token
    words = [tokenizer.decode([t]) for t in free[0].tokens]
    k = next(k for k in range(1, 8) if words[k].strip() and words[k] not in "".join(words[:k]))
    word = words[k]
    stop = StopStrings(tokenizer, [word, "never said"])
    with torch.no_grad():
        got = batched(model, prompts, images, 8, NEVER, stop=stop)
    assert got[0].finish == "stop" and got[0].tokens == free[0].tokens[: k + 1]
    answer = decode_reply(tokenizer, got[0], [word])
    assert answer == tokenizer.decode(free[0].tokens[:k], skip_special_tokens=True).strip()
    assert word not in answer
    for g, f in zip(got[1:], free[1:], strict=True):  # other rows: cut at their own first mention, if any
        text = tokenizer.decode(f.tokens, skip_special_tokens=True)
        assert (g.finish == "stop") == (word in text)
        assert g.tokens == f.tokens[: len(g.tokens)]


def test_stop_cut_takes_the_earliest_stop_string(tokenizer):
    stop = StopStrings(tokenizer, ["ASSISTANT", "."])
    assert stop.cut("It is red. ASSISTANT: no") == "It is red"
    assert stop.cut("no stop here") == "no stop here"


# ---- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"max_new_tokens": -2}, "max_new_tokens must be >= 0"),
        ({"stop": ["ok", ""]}, "stop strings must be non-empty strings"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kwargs)


def test_settings_defaults_and_a_single_stop_string():
    assert not GenerationConfig().sampling and GenerationConfig(temperature=0.7).sampling
    assert GenerationConfig(stop="###").stop == ["###"]


# ---- attention backends ------------------------------------------------------------------


def test_eager_attention_gives_the_same_replies(vocab, img, prompts, images, greedy_reference):
    eager = build_model(vocab, img, "eager")
    with torch.no_grad():
        got = batched(eager, prompts, images, 5, NEVER)
        reference = [greedy_reference(eager, p, x, 5, NEVER) for p, x in zip(prompts, images, strict=True)]
    assert [g.tokens for g in got] == reference


def reference_flash_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Flash attention's contract in plain PyTorch: a 2D padding mask (or None), causal from the bottom right
    (queries are the last positions of the keys), padded queries give zeros (flash never computes them).

    flash-attn needs CUDA; this stands in for its kernel so the path around it (the mask transformers
    hands a flash backend, the cache, the positions) runs on a CPU.
    """
    flash_calls.append(None if attention_mask is None else attention_mask.shape)
    q_len, k_len = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    allowed = torch.ones(q_len, k_len, dtype=torch.bool).tril(diagonal=k_len - q_len)[None, None]
    if attention_mask is not None:
        assert attention_mask.dim() == 2 and attention_mask.shape == (query.shape[0], k_len)
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)
    return out.nan_to_num(0.0).transpose(1, 2).contiguous(), None


flash_calls: list = []


def test_a_flash_backend_gets_the_padding_mask_and_gives_the_same_replies(
    vocab, img, prompts, images, greedy_reference, monkeypatch
):
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    from transformers.modeling_utils import AttentionInterface

    name = "flash_reference_cpu"  # 'flash' in the name: transformers treats it as a flash backend
    monkeypatch.setitem(AttentionInterface._global_mapping, name, reference_flash_attention)
    monkeypatch.setitem(AttentionMaskInterface._global_mapping, name, flash_attention_mask)
    flash = build_model(vocab, img)
    flash.llm.config._attn_implementation = name
    sdpa = build_model(vocab, img)
    flash_calls.clear()
    with torch.no_grad():
        got = batched(flash, prompts, images, 5, NEVER)
        alone = one(flash, prompts[1], images[1], 5, NEVER)
        reference = [greedy_reference(sdpa, p, x, 5, NEVER) for p, x in zip(prompts, images, strict=True)]
    assert [g.tokens for g in got] == reference and alone.tokens == reference[1]
    assert flash_calls[0] == (5, 17)  # the batch: the 2D padding mask of the left-padded prompts
    assert flash_calls[-1] is None  # one row alone, no padding: plain causal
