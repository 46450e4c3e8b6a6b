"""src.model.loss: the chunked cross-entropy equals the plain one in value and in every gradient.

float32 (what the loss computes in): the chunks change only the order of the sums, so the
tolerances are a few float32 ulps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from src.data.conversation import IGNORE_INDEX
from src.model.language import HideRowsBeyond
from src.model.loss import chunked_cross_entropy

HIDDEN, VOCAB = 16, 50


def make_head(seed: int = 0, hide_beyond: int | None = None) -> nn.Linear:
    torch.manual_seed(seed)
    head = nn.Linear(HIDDEN, VOCAB, bias=True)
    if hide_beyond is not None:
        head.register_forward_hook(HideRowsBeyond(hide_beyond))
    return head


def plain_and_chunked(head: nn.Linear, n: int, chunk_size: int, checkpoint_chunks: bool = True, softcap=None):
    """(value, grad of hidden, grads of the head) for the plain loss and for the chunked one."""
    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, HIDDEN, generator=g)
    targets = torch.randint(0, 40, (n,), generator=g)

    def logits_fn(h: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        return torch.tanh(logits / softcap) * softcap if softcap else logits

    results = []
    for chunked in (False, True):
        head.zero_grad(set_to_none=True)
        hidden = base.clone().requires_grad_(True)
        if chunked:
            loss = chunked_cross_entropy(hidden, targets, logits_fn, chunk_size, checkpoint_chunks)
        else:
            loss = F.cross_entropy(logits_fn(hidden).float(), targets)
        (loss * 3.0).backward()  # a scaled upstream gradient must reach through the chunks
        results.append((loss.detach(), hidden.grad, head.weight.grad.clone(), head.bias.grad.clone()))
    return results


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
@pytest.mark.parametrize("checkpoint_chunks", [True, False])
def test_chunked_equals_plain_in_value_and_gradients(chunk_size, checkpoint_chunks):
    plain, chunked = plain_and_chunked(make_head(), n=29, chunk_size=chunk_size, checkpoint_chunks=checkpoint_chunks)
    for a, b in zip(plain, chunked, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_equal_through_softcap_and_hidden_rows():
    """What `lm_logits` adds on top of the head (Gemma's soft-cap, hidden padding rows) stays inside each chunk."""
    plain, chunked = plain_and_chunked(make_head(hide_beyond=45), n=23, chunk_size=5, softcap=30.0)
    assert torch.isfinite(plain[0])
    for a, b in zip(plain, chunked, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_logits_exist_one_chunk_at_a_time_and_are_recomputed_in_backward():
    head = make_head()
    calls: list[tuple[int, bool]] = []

    def logits_fn(h: torch.Tensor) -> torch.Tensor:
        calls.append((h.shape[0], torch.is_grad_enabled()))
        return head(h)

    hidden = torch.randn(10, HIDDEN, dtype=torch.float32, requires_grad=True)
    loss = chunked_cross_entropy(hidden, torch.randint(0, VOCAB, (10,)), logits_fn, chunk_size=4)
    assert [rows for rows, _ in calls] == [4, 4, 2]  # forward: never more than a chunk of positions
    loss.backward()
    assert sorted(rows for rows, _ in calls[3:]) == [2, 4, 4]  # backward recomputed each chunk
    assert hidden.grad is not None and head.weight.grad is not None


def test_one_chunk_is_not_recomputed():
    """Its logits would be alive with the decoder's activations when backward starts either way."""
    head = make_head()
    calls = []

    def logits_fn(h: torch.Tensor) -> torch.Tensor:
        calls.append(h.shape[0])
        return head(h)

    hidden = torch.randn(4, HIDDEN, requires_grad=True)
    chunked_cross_entropy(hidden, torch.randint(0, VOCAB, (4,)), logits_fn, chunk_size=4).backward()
    assert calls == [4] and hidden.grad is not None


def test_without_grad_nothing_is_recomputed():
    head = make_head()
    with torch.no_grad():
        value = chunked_cross_entropy(torch.randn(9, HIDDEN), torch.zeros(9, dtype=torch.long),
                                      head, chunk_size=4)  # fmt: skip
    assert value.ndim == 0 and not value.requires_grad


@pytest.mark.parametrize(
    ("hidden", "targets", "chunk", "message"),
    [
        (torch.zeros(3, HIDDEN), torch.zeros(2, dtype=torch.long), 4, "expected hidden"),
        (torch.zeros(3, HIDDEN), torch.zeros(3, dtype=torch.long), 0, "chunk_size must be at least 1"),
        (torch.zeros(0, HIDDEN), torch.zeros(0, dtype=torch.long), 4, "no positions"),
    ],
)
def test_bad_input_is_a_clear_error(hidden, targets, chunk, message):
    with pytest.raises(ValueError, match=message):
        chunked_cross_entropy(hidden, targets, nn.Linear(HIDDEN, VOCAB), chunk_size=chunk)


def test_llava_supervised_loss_is_the_plain_mean_over_supervised_tokens():
    """`LlavaModel.supervised_loss` (chunked, small chunks) against the formula it replaced."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from src.model.language import lm_logits
    from src.model.llava import LlavaModel

    torch.manual_seed(0)
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )  # fmt: skip
    )
    model = LlavaModel(nn.Identity(), nn.Identity(), llm, image_token_id=VOCAB - 1)
    model.loss_chunk_size = 3
    hidden = torch.randn(2, 9, HIDDEN, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 9))
    labels[0, :4] = IGNORE_INDEX
    labels[1, 6:] = IGNORE_INDEX
    loss, count = model.supervised_loss(hidden, labels)
    (grad,) = torch.autograd.grad(loss, hidden)
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    expected = F.cross_entropy(lm_logits(llm, hidden[:, :-1][keep]).float(), targets[keep])
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    assert count == int(keep.sum()) == 10  # 5 of row 0 (positions 4-8), 5 of row 1 (1-5)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-8)
    assert model.supervised_loss(hidden, torch.full_like(labels, IGNORE_INDEX))[1] == 0
