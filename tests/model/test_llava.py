"""src.model.llava: image features spliced at placeholders, and the supervised-only loss."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_llava_model

from src.data.batching import collate_packed
from src.data.conversation import IGNORE_INDEX
from src.data.datamodule import collate
from src.data.samples import Example
from src.model.language import SDPA_BY_EXAMPLE, lm_logits, padded_vocab
from src.model.llava import LlavaModel, flatten_packed, uses_flash_attention

pytestmark = pytest.mark.usefixtures("single_thread")

IMG = 5  # the placeholder id
PAD = 0
VOCAB = 40
T = 4  # tokens per image: a 32 px image with 16 px patches


def build_model(attn_implementation: str = "sdpa") -> LlavaModel:
    """The tiny LLaVA; the same weights for every backend (same seed)."""
    llama = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return tiny_llava_model(llama, VOCAB, IMG, attn_implementation)


@pytest.fixture(scope="module")
def model() -> LlavaModel:
    return build_model("sdpa")


def padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([row + [PAD] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    return ids, mask


ROWS = [
    [1, 7] + [IMG] * T + [8] + [IMG] * T + [9, 10, 11],  # two images
    [1, 12, 13, 14, 15, 16, 17],  # text only
    [1] + [IMG] * T + [18, 19],  # one image
]


@pytest.fixture(scope="module")
def batch():
    ids, mask = padded(ROWS)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 12:14] = ids[0, 12:14]
    labels[1, 4:7] = ids[1, 4:7]
    labels[2, 5:7] = ids[2, 5:7]
    return ids, mask, pixels, labels


def test_image_tokens(model):
    assert model.image_tokens == T


def test_embed_splices_features_in_sample_then_image_order(model, batch):
    ids, _, pixels, _ = batch
    with torch.no_grad():
        embedded = model.embed(ids, pixels)
        features = model.projector(model.vision(pixels))
        table = model.llm.get_input_embeddings().weight
    assert features.shape == (3, T, 32)
    expected = table[ids].clone()
    expected[0, 2 : 2 + T] = features[0]
    expected[0, 3 + T : 3 + 2 * T] = features[1]
    expected[2, 1 : 1 + T] = features[2]
    assert torch.equal(embedded, expected)
    # and elsewhere exactly the token embeddings
    text = ids != IMG
    assert torch.equal(embedded[text], table[ids[text]])


def test_text_only_row_is_unchanged_by_its_batch(model, batch):
    ids, mask, pixels, _ = batch
    alone = torch.tensor([ROWS[1]])
    with torch.no_grad():
        in_batch = model.embed(ids, pixels)[1, : len(ROWS[1])]
        by_itself = model.embed(alone, None)[0]
        hidden_batch = model(ids, mask, pixels).hidden_states[1, : len(ROWS[1])]
        hidden_alone = model(alone, torch.ones_like(alone), None).hidden_states[0]
    assert torch.equal(in_batch, by_itself)
    torch.testing.assert_close(hidden_batch, hidden_alone, atol=1e-5, rtol=1e-5)


def test_empty_pixel_batch_is_text_only(model):
    ids = torch.tensor([ROWS[1]])
    with torch.no_grad():
        assert torch.equal(model.embed(ids, torch.zeros(0, 3, 32, 32)), model.llm.get_input_embeddings()(ids))


def test_placeholders_without_images(model, batch):
    ids = batch[0]
    with pytest.raises(ValueError, match=re.escape(f"{3 * T} image placeholder tokens but no images in the batch")):
        model.embed(ids, None)


@pytest.mark.parametrize("images", [2, 4])
def test_placeholder_and_image_count_must_agree(model, batch, images):
    ids = batch[0]
    pixels = torch.zeros(images, 3, 32, 32)
    message = f"{images} images make {images * T} tokens but the batch has {3 * T} image placeholder tokens"
    with pytest.raises(ValueError, match=re.escape(message)):
        model.embed(ids, pixels)


def test_images_without_placeholders(model):
    with pytest.raises(
        ValueError, match=re.escape(f"1 images make {T} tokens but the batch has 0 image placeholder tokens")
    ):
        model.embed(torch.tensor([ROWS[1]]), torch.zeros(1, 3, 32, 32))


def test_supervised_loss_equals_full_cross_entropy(model, batch):
    ids, mask, pixels, labels = batch
    with torch.no_grad():
        out = model(ids, mask, pixels, labels)
        logits = model.llm(inputs_embeds=model.embed(ids, pixels), attention_mask=mask).logits
    reference = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert out.supervised_tokens == int((labels[:, 1:] != IGNORE_INDEX).sum()) == 7
    assert abs(out.loss.item() - reference.item()) < 1e-5
    assert out.hidden_states.shape == (3, ids.shape[1], 32)
    # positions with a label at index 0 can never be predicted: they are not counted
    shifted = labels.clone()
    shifted[:, 0] = ids[:, 0]
    assert model.supervised_loss(out.hidden_states, shifted)[1] == 7


def test_loss_without_supervised_tokens_is_zero_but_connected(model, batch):
    ids, mask, pixels, _ = batch
    out = model(ids, mask, pixels, torch.full_like(ids, IGNORE_INDEX))
    assert out.supervised_tokens == 0 and out.loss.item() == 0.0
    assert out.loss.requires_grad
    out.loss.backward()
    model.zero_grad(set_to_none=True)


def test_no_labels_no_loss(model, batch):
    ids, mask, pixels, _ = batch
    with torch.no_grad():
        out = model(ids, mask, pixels)
    assert out.loss is None and out.supervised_tokens == 0


def test_logits_at(model, batch):
    ids, mask, pixels, _ = batch
    with torch.no_grad():
        hidden = model(ids, mask, pixels).hidden_states
        full = model.llm(inputs_embeds=model.embed(ids, pixels), attention_mask=mask).logits
        positions = torch.tensor([len(r) - 1 for r in ROWS])
        got = model.logits_at(hidden, positions)
    assert got.shape == (3, padded_vocab(VOCAB)) and got.dtype == torch.float32
    torch.testing.assert_close(got, full[torch.arange(3), positions], atol=1e-5, rtol=1e-5)


def test_gradients_reach_a_trainable_tower_only(model, batch):
    ids, mask, pixels, labels = batch
    try:
        model.vision.requires_grad_(False)
        model(ids, mask, pixels, labels).loss.backward()
        assert all(p.grad is None for p in model.vision.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
        model.zero_grad(set_to_none=True)
        model.vision.requires_grad_(True)
        model(ids, mask, pixels, labels).loss.backward()
        assert model.vision.model.patch_embed.proj.weight.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.vision.requires_grad_(True)


def test_generate_batched_equals_one_by_one(model, batch, greedy_reference):
    ids, _, pixels, _ = batch
    lengths = torch.tensor([len(r) for r in ROWS])
    row_pixels = [pixels[0:2], None, pixels[2:3]]
    with torch.no_grad():
        never = VOCAB + 1  # an eos that never comes: every row runs all steps
        alone = [greedy_reference(model, row, p, 5, never) for row, p in zip(ROWS, row_pixels, strict=True)]
        assert model.generate(ids, lengths, pixels, max_new_tokens=5, eos_token_id=never) == alone
        assert all(len(a) == 5 for a in alone)
        # the first token of row 1 as eos: row 1 stops at once, the others go on until they emit it
        eos = alone[1][0]
        expected = [greedy_reference(model, row, p, 5, eos) for row, p in zip(ROWS, row_pixels, strict=True)]
        assert expected[1] == []
        assert model.generate(ids, lengths, pixels, max_new_tokens=5, eos_token_id=eos) == expected


PROMPTS = [ROWS[0][:12], ROWS[1][:3], ROWS[2][:6]]  # shorter than their rows, every image inside


def test_generate_stops_each_row_at_its_own_eos(model, batch, greedy_reference):
    ids, _, pixels, _ = batch
    lengths = torch.tensor([len(p) for p in PROMPTS])
    row_pixels = [pixels[0:2], None, pixels[2:3]]
    with torch.no_grad():
        free = [greedy_reference(model, p, px, 4, VOCAB + 1) for p, px in zip(PROMPTS, row_pixels, strict=True)]
        eos = free[2][1]  # row 2's second token: row 2 stops after one token
        expected = [out[: out.index(eos)] if eos in out else out for out in free]
        assert expected == [greedy_reference(model, p, px, 4, eos) for p, px in zip(PROMPTS, row_pixels, strict=True)]
        got = model.generate(ids, lengths, pixels, max_new_tokens=4, eos_token_id=eos)
    assert got == expected
    assert len(got[2]) == free[2].index(eos) <= 1
    assert len({len(out) for out in got}) >= 2  # rows finish at different steps
    assert all(eos not in out for out in got)  # the eos is stripped and nothing follows it
    assert [len(out) for out, f in zip(got, free, strict=True) if eos not in f] == [4] * sum(eos not in f for f in free)


def test_generate_reads_only_the_prompt_of_each_row(model, batch, greedy_reference):
    """Prompts shorter than their rows (the gold reply follows in a training batch): the tail is never seen."""
    ids, _, pixels, _ = batch
    prompts = PROMPTS
    lengths = torch.tensor([len(p) for p in prompts])
    row_pixels = [pixels[0:2], None, pixels[2:3]]
    with torch.no_grad():
        expected = [greedy_reference(model, p, px, 4, VOCAB + 1) for p, px in zip(prompts, row_pixels, strict=True)]
        got = model.generate(ids, lengths, pixels, max_new_tokens=4, eos_token_id=VOCAB + 1)
        tail_changed = ids.clone()
        for row, n in enumerate(lengths.tolist()):
            tail_changed[row, n:] = torch.where(ids[row, n:] == IMG, IMG, 30)  # images stay, the rest changes
        assert model.generate(tail_changed, lengths, pixels, max_new_tokens=4, eos_token_id=VOCAB + 1) == got
        # a row generated on its own gives the same tokens as in the batch
        for row in range(3):
            single = model.generate(torch.tensor([prompts[row]]), lengths[row : row + 1], row_pixels[row], 4, VOCAB + 1)
            assert single == [expected[row]], row
    assert got == expected and all(len(out) == 4 for out in got)
    assert model.generate(ids, lengths, pixels, max_new_tokens=0, eos_token_id=VOCAB + 1) == [[], [], []]


def reference_scores(model, prompt: list[int], pixels, candidates: list[list[int]]) -> list[float]:
    """Each (prompt + candidate) alone through the full LM head: summed log-probabilities of the candidate."""
    scores = []
    for candidate in candidates:
        sequence = torch.tensor([prompt + candidate])
        logits = model.llm(inputs_embeds=model.embed(sequence, pixels)).logits[0]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        positions = range(len(prompt) - 1, len(prompt) + len(candidate) - 1)
        scores.append(sum(log_probs[p, t].item() for p, t in zip(positions, candidate, strict=True)))
    return scores


CANDIDATES = [
    [[20, 2], [21, 22, 23, 2], [24, 2]],  # row 0, two images: three candidates of different lengths
    [[25, 2], [26, 2]],  # row 1, text only: two candidates, the third slot is padding
    [[27], [20, 2], [28, 29, 30, 31, 32, 2]],  # row 2, one image
]


def test_score_candidates_equals_scoring_each_sequence_alone(model, batch):
    ids, _, pixels, _ = batch
    prompts = [ROWS[0][:12], ROWS[1], ROWS[2][:6]]  # rows 0 and 2 have tokens after the prompt
    lengths = torch.tensor([len(p) for p in prompts])
    row_pixels = [pixels[0:2], None, pixels[2:3]]
    with torch.no_grad():
        scores = model.score_candidates(ids, lengths, pixels, CANDIDATES)
        expected = [reference_scores(model, p, px, c) for p, px, c in zip(prompts, row_pixels, CANDIDATES, strict=True)]
    assert scores.shape == (3, 3) and scores.dtype == torch.float32
    for row, values in enumerate(expected):
        torch.testing.assert_close(scores[row, : len(values)], torch.tensor(values), atol=1e-4, rtol=0)
    assert scores[1, 2].item() == float("-inf")  # padding for the row with fewer candidates
    assert torch.isfinite(scores[[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 2, 0, 1, 0, 1, 2]]).all()
    assert (scores[torch.isfinite(scores)] < 0).all()
    # the argmax over a row never picks the padding
    assert scores.argmax(dim=1)[1].item() in (0, 1)


def test_score_candidates_is_independent_of_the_batch_and_the_tail(model, batch):
    ids, _, pixels, _ = batch
    lengths = torch.tensor([12, len(ROWS[1]), 6])
    row_pixels = [pixels[0:2], None, pixels[2:3]]
    with torch.no_grad():
        scores = model.score_candidates(ids, lengths, pixels, CANDIDATES)
        tail_changed = ids.clone()
        tail_changed[0, 12:] = 33
        tail_changed[2, 6:] = 34
        torch.testing.assert_close(model.score_candidates(tail_changed, lengths, pixels, CANDIDATES), scores)
        for row in range(3):
            n = int(lengths[row])
            alone = model.score_candidates(
                ids[row : row + 1, :n], lengths[row : row + 1], row_pixels[row], [CANDIDATES[row]]
            )
            torch.testing.assert_close(alone[0], scores[row, : len(CANDIDATES[row])], atol=1e-5, rtol=0)
        # a row without candidates scores -inf everywhere and does not disturb the others
        some_empty = model.score_candidates(ids, lengths, pixels, [CANDIDATES[0], [], CANDIDATES[2]])
    assert some_empty.shape == (3, 3)
    assert torch.isinf(some_empty[1]).all() and (some_empty[1] < 0).all()
    torch.testing.assert_close(some_empty[[0, 2]], scores[[0, 2]], atol=1e-5, rtol=0)


def test_single_token_candidates_are_the_next_token_distribution(model, batch):
    """One-token candidates score log_softmax of the logits at the prompt's last token."""
    ids, mask, pixels, _ = batch
    lengths = torch.tensor([len(r) for r in ROWS])
    tokens = [t for t in range(VOCAB) if t != IMG]
    with torch.no_grad():
        scores = model.score_candidates(ids, lengths, pixels, [[[t] for t in tokens]] * 3)
        hidden = model(ids, mask, pixels).hidden_states
        log_probs = torch.log_softmax(model.logits_at(hidden, lengths - 1), dim=-1)
        greedy = model.generate(ids, lengths, pixels, max_new_tokens=1, eos_token_id=VOCAB + 1)
    torch.testing.assert_close(scores, log_probs[:, tokens], atol=1e-4, rtol=0)
    for row in range(3):
        if greedy[row][0] != IMG:  # the greedy token is the best-scored candidate
            assert tokens[int(scores[row].argmax())] == greedy[row][0]


# ---- packed (padding-free) batches -------------------------------------------------------


def packed_example(length: int, images: int, seed: int, supervised_from: int | None = None) -> Example:
    """`images` images of T placeholders after a BOS and a word each; supervised from the middle on."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(IMG + 1, VOCAB, (length,), generator=g)
    ids[0] = 1
    for k in range(images):
        ids[2 + k * (T + 1) : 2 + k * (T + 1) + T] = IMG
    labels = ids.clone()
    labels[: length // 2 if supervised_from is None else supervised_from] = IGNORE_INDEX
    labels[ids == IMG] = IGNORE_INDEX
    pixels = torch.randn(images, 3, 32, 32, generator=g) if images else None
    return Example(ids, labels, pixels)


# image and text-only examples mixed, several per row, and a short last row with a padding tail;
# the middle text example is supervised from its first token, which packing must not let its
# neighbour predict
PACKED_ROWS = [
    [packed_example(14, 2, 1), packed_example(7, 0, 2)],
    [packed_example(9, 1, 3), packed_example(5, 0, 4, supervised_from=0), packed_example(11, 1, 5)],
    [packed_example(6, 0, 6)],
]


def flex_without_compile(patch: pytest.MonkeyPatch) -> None:
    """FlexAttention as PyTorch defines it, uncompiled, with transformers' own BlockMask and mask functions.

    On a CPU the compiled kernel has no backward (torch raises "FlexAttention does not support
    backward on CPU") and compiling its forward takes about a minute here. Uncompiled,
    `flex_attention` evaluates the same `mask_mod` and `BlockMask` that transformers builds from
    the packed positions, in plain PyTorch with autograd: what these tests check is the mask and
    the backend's wiring; the compiled kernel is checked on a GPU by `benchmarks/gpu_check.py`.
    """
    import torch.nn.attention.flex_attention as flex
    import transformers.integrations.flex_attention as hf_flex
    import transformers.masking_utils as masking

    real_block_mask = masking.create_block_mask
    patch.setattr(flex, "_validate_device", lambda *tensors: None)
    patch.setattr(hf_flex.WrappedFlexAttention, "__call__", lambda self: flex.flex_attention)
    patch.setattr(masking, "create_block_mask", lambda *a, **k: real_block_mask(*a, **(k | {"_compile": False})))


BACKENDS = ["sdpa", "eager", "flex_attention"]


@pytest.fixture(scope="module", params=BACKENDS)
def backend_model(request) -> LlavaModel:
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "flex_attention" and not torch.cuda.is_available():
            flex_without_compile(patch)
        model = build_model(request.param)
        expected = SDPA_BY_EXAMPLE if request.param == "sdpa" else request.param
        assert model.llm.config._attn_implementation == expected
        yield model


def test_packed_loss_equals_padded_loss(backend_model):
    packed = collate_packed(PACKED_ROWS, PAD)
    padded_batch = collate([e for row in PACKED_ROWS for e in row], PAD)
    assert packed["attention_mask"] is None and packed["input_ids"].shape == (3, 25)
    with torch.no_grad():
        got = backend_model(
            packed["input_ids"], None, packed["pixel_values"], packed["labels"], position_ids=packed["position_ids"]
        )
        expected = backend_model(
            padded_batch["input_ids"],
            padded_batch["attention_mask"],
            padded_batch["pixel_values"],
            padded_batch["labels"],
        )
    assert got.supervised_tokens == expected.supervised_tokens == 22
    assert abs(got.loss.item() - expected.loss.item()) < 1e-5


def test_packed_logits_equal_each_example_alone(backend_model):
    packed = collate_packed(PACKED_ROWS, PAD)
    with torch.no_grad():
        hidden = backend_model(
            packed["input_ids"], None, packed["pixel_values"], position_ids=packed["position_ids"]
        ).hidden_states
        for r, row in enumerate(PACKED_ROWS):
            start = 0
            for example in row:
                n = len(example.input_ids)
                alone = backend_model(example.input_ids[None], None, example.pixel_values).hidden_states[0]
                torch.testing.assert_close(
                    lm_logits(backend_model.llm, hidden[r, start : start + n]),
                    lm_logits(backend_model.llm, alone),
                    atol=1e-5,
                    rtol=0,
                )
                start += n


def test_packed_gradients_equal_padded_gradients(backend_model):
    """Training on a packed batch is training on the examples apart: same loss, same gradient everywhere."""
    packed = collate_packed(PACKED_ROWS, PAD)
    padded_batch = collate([e for row in PACKED_ROWS for e in row], PAD)
    backend_model.vision.requires_grad_(True)  # gradients through the tower's path too
    try:
        gradients = []
        for batch, mask, positions in (
            (packed, None, packed["position_ids"]),
            (padded_batch, padded_batch["attention_mask"], None),
        ):
            backend_model.zero_grad(set_to_none=True)
            out = backend_model(
                batch["input_ids"], mask, batch["pixel_values"], batch["labels"], position_ids=positions
            )
            out.loss.backward()
            gradients.append((out.loss.item(), {n: p.grad.clone() for n, p in backend_model.named_parameters()}))
    finally:
        backend_model.zero_grad(set_to_none=True)
        backend_model.vision.requires_grad_(False)
    (packed_loss, packed_grads), (padded_loss, padded_grads) = gradients
    assert packed_loss == pytest.approx(padded_loss, rel=1e-6)
    assert packed_grads.keys() == padded_grads.keys() and len(packed_grads) > 20
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, padded_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    assert any(g.abs().max() > 1e-3 for n, g in packed_grads.items() if n.startswith("vision"))


def test_sdpa_is_handed_each_rows_example_spans(model, monkeypatch):
    """The kit's sdpa gets the packed rows' spans, so it never computes attention across examples."""
    from transformers.modeling_utils import AttentionInterface

    from src.model import language

    seen = []

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        seen.append(kwargs.get("packed_segments"))
        return language.sdpa_by_example(module, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, SDPA_BY_EXAMPLE, spy)
    packed = collate_packed(PACKED_ROWS, PAD)
    with torch.no_grad():
        model(packed["input_ids"], None, packed["pixel_values"], position_ids=packed["position_ids"])
    assert seen == [[[(0, 14), (14, 21), (21, 25)], [(0, 9), (9, 14), (14, 25)], [(0, 6), (6, 25)]]] * 2
    seen.clear()
    padded_batch = collate([e for row in PACKED_ROWS for e in row], PAD)
    with torch.no_grad():
        model(padded_batch["input_ids"], padded_batch["attention_mask"], padded_batch["pixel_values"])
    assert seen == [None, None]  # padded batches: transformers' SDPA as it is


def test_flex_block_mask_is_the_block_diagonal_causal_mask_and_skips_blocks_across_examples(monkeypatch):
    """transformers' FlexAttention mask for packed positions, against its SDPA mask and by block.

    Two examples of 128 tokens (FlexAttention's block size) and one of 100 plus a padding tail:
    every (query, key) pair is allowed exactly where SDPA's dense mask allows it, and the
    blocks of one example's queries against another's keys are absent from the BlockMask,
    so the kernel never computes them (the reason flex beats a dense mask on packed rows).
    """
    from transformers import LlamaConfig
    from transformers.masking_utils import create_causal_mask

    flex_without_compile(monkeypatch)
    lengths = [[128, 128], [100, 156]]
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    embeds = torch.zeros(2, 256, 8)

    def mask_for(backend: str):
        config = LlamaConfig(hidden_size=8, num_attention_heads=1, num_hidden_layers=1)
        config._attn_implementation = backend
        return create_causal_mask(config, embeds, None, None, position_ids=positions)

    dense = mask_for("sdpa")
    block = mask_for("flex_attention")
    q = torch.arange(256)
    rows = torch.arange(2)[:, None, None, None]
    allowed = block.mask_mod(rows, torch.zeros_like(rows), q[None, None, :, None], q[None, None, None, :])
    assert dense.shape == (2, 1, 256, 256) and dense.dtype == torch.bool
    assert torch.equal(allowed.expand_as(dense), dense)
    doc = torch.tensor([[0] * 128 + [1] * 128, [0] * 100 + [1] * 156])
    expected = (doc[:, :, None] == doc[:, None, :]) & (q[:, None] >= q[None, :])
    assert torch.equal(dense[:, 0], expected)
    # blocks of 128x128: row 0 has no block of example 1's queries on example 0's keys
    assert block.to_dense()[0, 0].tolist() == [[1, 0], [0, 1]]
    assert block.to_dense()[1, 0].tolist() == [[1, 0], [1, 1]]  # the second example starts inside block 0


def test_without_position_ids_packed_examples_would_see_each_other(model):
    """The check above has teeth: with one causal mask per row, the second example's logits change."""
    packed = collate_packed(PACKED_ROWS, PAD)
    first, second = PACKED_ROWS[0]
    with torch.no_grad():
        hidden = model(packed["input_ids"], None, packed["pixel_values"]).hidden_states
        alone = model(second.input_ids[None], None, second.pixel_values).hidden_states[0]
    n = len(first.input_ids)
    assert (hidden[0, n : n + len(second.input_ids)] - alone).abs().max() > 1e-2


def test_flatten_packed_round_trips_and_gives_flash_varlen_boundaries():
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    packed = collate_packed(PACKED_ROWS, PAD)
    positions = packed["position_ids"]
    embeddings = torch.randn(3, 25, 8)
    flat, flat_positions, varlen = flatten_packed(embeddings, positions)
    assert flat.shape == (1, 75, 8) and flat_positions.shape == (1, 75)
    assert torch.equal(flat.view(3, 25, -1), embeddings) and torch.equal(flat_positions.view(3, 25), positions)
    # examples 14, 7 | 9, 5, 11 | 6 and a tail of 19, one after another in the flat row
    expected = torch.tensor([0, 14, 21, 25, 34, 39, 50, 56, 75], dtype=torch.int32)
    assert torch.equal(varlen["cu_seq_lens_q"], expected) and torch.equal(varlen["cu_seq_lens_k"], expected)
    assert varlen["max_length_q"] == varlen["max_length_k"] == 19
    # what transformers itself infers from the flat positions (its batch-size-1 varlen path)
    (reference, _), (longest, _) = prepare_fa_kwargs_from_position_ids(flat_positions)
    assert torch.equal(reference, expected) and int(longest) == 19
    with pytest.raises(ValueError, match="packed rows must start an example at position 0 in every row"):
        flatten_packed(embeddings, positions + 1)


def reference_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Flash attention's varlen contract in plain PyTorch: causal attention within each cu_seq_lens segment.

    flash-attn needs CUDA; this stands in for its kernel so the flattening around it runs on a CPU.
    """
    calls.append({"batch": query.shape[0], **{k: kwargs.get(k) for k in ("cu_seq_lens_q", "max_length_q")}})
    assert attention_mask is None and query.shape[0] == 1
    bounds = kwargs["cu_seq_lens_q"].tolist()
    out = torch.cat(
        [
            F.scaled_dot_product_attention(
                query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling
            )
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ],
        dim=2,
    )
    return out.transpose(1, 2).contiguous(), None


calls: list[dict] = []


def test_flash_path_flattens_rows_and_matches_padded_loss(monkeypatch):
    """The flash path end to end, with a CPU stand-in for the kernel: one flat row, boundaries passed in."""
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    from transformers.modeling_utils import AttentionInterface

    name = "flash_reference_cpu"  # 'flash' in the name: transformers (and LlavaModel) treat it as flash attention
    monkeypatch.setitem(AttentionInterface._global_mapping, name, reference_varlen_attention)
    monkeypatch.setitem(AttentionMaskInterface._global_mapping, name, flash_attention_mask)
    flash_model = build_model("sdpa")
    flash_model.llm.config._attn_implementation = name
    assert uses_flash_attention(flash_model.llm.get_decoder().config)
    packed = collate_packed(PACKED_ROWS, PAD)
    padded_batch = collate([e for row in PACKED_ROWS for e in row], PAD)
    calls.clear()
    with torch.no_grad():
        got = flash_model(
            packed["input_ids"], None, packed["pixel_values"], packed["labels"], position_ids=packed["position_ids"]
        )
    assert len(calls) == 2  # one per layer, each on the flat row with the boundaries
    assert all(c["batch"] == 1 and c["max_length_q"] == 19 for c in calls)
    assert calls[0]["cu_seq_lens_q"].tolist() == [0, 14, 21, 25, 34, 39, 50, 56, 75]
    with torch.no_grad():
        expected = build_model("sdpa")(
            padded_batch["input_ids"],
            padded_batch["attention_mask"],
            padded_batch["pixel_values"],
            padded_batch["labels"],
        )
    assert abs(got.loss.item() - expected.loss.item()) < 1e-5
    assert got.hidden_states.shape == (3, 25, 32)


def test_a_text_only_batch_still_gives_every_trainable_image_parameter_a_gradient(model):
    """DDP needs a gradient for every trainable parameter on every step, even without images."""
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    model.train()
    model.vision.requires_grad_(True)
    ids = torch.tensor([[6, 7, 8, 9, 10]])
    assert IMG not in ids
    out = model(ids, torch.ones_like(ids), None, ids.clone())
    out.loss.backward()
    for part in (model.vision, model.projector):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None and not g.any() for g in grads)  # present, and zero
    with torch.no_grad():  # the text logits are untouched by it
        assert torch.equal(model.embed(ids, None), model.llm.get_input_embeddings()(ids))
    model.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        p.requires_grad_(before[name])
    model.eval()
