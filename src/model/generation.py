"""Batched generation for LlavaModel: left padding, a KV cache, greedy or nucleus sampling.

Why left padding: with a KV cache every row appends its next token at the same column, so
the prompts must all end at the same column; the padding goes on the left, masked out of
attention, and each row's positions count from 0 at its first real token (from the mask's
cumulative sum), so a row sees exactly what it would see alone. Getting either wrong is
the usual silent accuracy loss of batched VLM decoding: the answer still reads fine, it
is just not the answer the model gives to that prompt alone. The tests check batched =
unbatched = a full recompute without cache, token for token.

The images are encoded once, spliced into the prompts' embeddings (right-padded, as the
data pipeline makes them) and the embeddings are then moved to the right edge.

Sampling is reproducible per sample: each row draws from its own `torch.Generator`
seeded from (seed, sample id), one uniform number per generated token, and picks the token
by inverting the (top-p truncated) distribution, so a sample's sampled answer does not
depend on which batch it is in, nor on the number of processes.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import DynamicCache, PreTrainedModel

from src.model.language import lm_logits


class Embeds(Protocol):
    """What generation needs of a model (LlavaModel is one): its input embeddings with the image
    features spliced in, and its causal LM. A protocol, so generation does not import llava.py,
    which imports generation."""

    llm: PreTrainedModel

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_sizes: torch.Tensor | None = None
    ) -> torch.Tensor: ...


FINISH_REASONS = ("eos", "stop", "length")


@dataclass
class GenerationConfig:
    """How replies are generated (`predict`, `src.chat`)."""

    max_new_tokens: int | None = None
    """Longest reply in tokens; None: the module's `max_new_tokens`."""
    temperature: float = 0.0
    """0 is greedy decoding; above 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: sample among the most likely tokens whose probabilities sum to top_p."""
    seed: int = 0
    """With `sample id`, seeds each row's generator: a sample's sampled reply is the same in any batch."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a reply; the reply is cut before the first one found."""

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        self.stop = list(self.stop)

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


@dataclass
class Generated:
    """One row's reply: its token ids (eos excluded) and why it ended (`eos`, `stop`, `length`)."""

    tokens: list[int]
    finish: str


def row_seed(seed: int, sample_id: object) -> int:
    """A 63-bit seed from (seed, sample id), stable across processes and Python runs (unlike hash())."""
    digest = hashlib.sha256(f"{seed}\x00{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def row_generators(seed: int, sample_ids: Sequence[object], device: torch.device | str) -> list[torch.Generator]:
    """One generator per row, seeded from (seed, its sample id)."""
    return [torch.Generator(device=device).manual_seed(row_seed(seed, i)) for i in sample_ids]


class StopStrings:
    """Ends a reply when its decoded text holds a stop string, and cuts the text before it."""

    def __init__(self, tokenizer, strings: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.strings = [s for s in strings if s]
        self.window = 2 * max((len(s) for s in self.strings), default=0) + 8

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def hit(self, tokens: list[int]) -> bool:
        """Whether the reply's end holds a stop string; only a tail long enough to hold the longest
        one is decoded (a token gives at least one character once its bytes are complete), so the
        check costs the same at every step."""
        if not self.strings:
            return False
        text = self.text(tokens[-self.window :])
        return any(s in text for s in self.strings)

    def cut(self, text: str) -> str:
        """The text before the earliest stop string (all of it when there is none)."""
        ends = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        return text[: min(ends)] if ends else text


def decode_reply(tokenizer, generated: Generated, stop: Sequence[str] = ()) -> str:
    """The reply's text: decoded without special tokens, cut before the first stop string, stripped."""
    return StopStrings(tokenizer, stop).cut(tokenizer.decode(generated.tokens, skip_special_tokens=True)).strip()


def left_pad(embeddings: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (rows, L, H) prompts of `lengths` -> left-padded (rows, max length, H) and its mask.

    The padding columns hold zeros; they are masked out of attention either way.
    """
    width = int(lengths.max())
    source = torch.arange(width, device=embeddings.device)[None] - (width - lengths)[:, None]
    valid = source >= 0
    index = source.clamp(min=0)[..., None].expand(-1, -1, embeddings.shape[2])
    moved = embeddings.gather(1, index) * valid[..., None].to(embeddings.dtype)
    return moved, valid.long()


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Each row's positions count from 0 at its first real token; padding gets 0 (it is masked)."""
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


def _cache_kwarg(decoder: torch.nn.Module) -> str:
    """transformers 5.24 names the cache argument `cache` (`past_key_values` is deprecated); remote code may not."""
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def choose_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generators: Sequence[torch.Generator] | None
) -> torch.Tensor:
    """(rows, vocab) float logits -> (rows,) tokens: argmax, or one draw per row from its own generator.

    A draw inverts the cumulative distribution at a uniform number from the row's generator
    (the tokens sorted by probability, cut to the top-p nucleus), so the token depends on the
    row's logits and its generator only.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    if generators is None or len(generators) != logits.shape[0]:
        raise ValueError("sampling needs one generator per row")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
    kept = torch.where(before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    kept[:, 0] = sorted_probs[:, 0]  # the most likely token is always a candidate
    cumulative = kept.cumsum(dim=-1)
    uniforms = torch.stack([torch.rand((), generator=g, device=g.device).to(logits.device) for g in generators]).float()
    picked = torch.searchsorted(cumulative, (uniforms * cumulative[:, -1])[:, None], right=True)
    picked = picked.clamp(max=logits.shape[-1] - 1)
    # a draw landing in a zero-probability tail after the nucleus falls back on the nucleus' last token
    picked = torch.minimum(picked, (kept > 0).sum(dim=-1, keepdim=True) - 1)
    return order.gather(1, picked).squeeze(1)


@torch.no_grad()
def generate(
    model: Embeds,
    input_ids: torch.Tensor,
    prompt_lengths: torch.Tensor,
    pixel_values: torch.Tensor | None,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generators: Sequence[torch.Generator] | None = None,
    stop: StopStrings | None = None,
    all_done: Callable[[bool], bool] | None = None,
    image_sizes: torch.Tensor | None = None,
) -> list[Generated]:
    """Replies to right-padded prompts: row r's prompt is `input_ids[r, :prompt_lengths[r]]`.

    `pixel_values` holds every image of `input_ids` (prompt or not) in row order, as the data
    pipeline stacks them, and `image_sizes` their (height, width) (anyres + unpad only); what
    follows a prompt in its row is never seen. A row ends at an
    eos (not returned), when its decoded text holds a stop string (`stop`), or after
    `max_new_tokens`; finished rows leave the batch (and its KV cache).

    `all_done(local)` must return whether every process is done: under FSDP each decoder
    call gathers parameters on all ranks, so all ranks must make the same number of calls;
    a rank whose rows are finished keeps stepping (outputs ignored) until all are.
    """
    rows = input_ids.shape[0]
    results = [Generated([], "length") for _ in range(rows)]
    if max_new_tokens <= 0 or rows == 0:
        return results
    eos = torch.tensor(
        [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
        dtype=torch.long,
        device=input_ids.device,
    )
    prompt_lengths = prompt_lengths.to(input_ids.device)
    embeddings, mask = left_pad(model.embed(input_ids, pixel_values, image_sizes), prompt_lengths)
    decoder = model.llm.get_decoder()
    table = model.llm.get_input_embeddings()
    cache = DynamicCache(config=decoder.config)
    cache_arg = {_cache_kwarg(decoder): cache}
    hidden = decoder(
        inputs_embeds=embeddings, attention_mask=mask, position_ids=positions_of(mask), use_cache=True, **cache_arg
    ).last_hidden_state[:, -1]
    active = list(range(rows))  # batch row -> sample row
    positions = prompt_lengths.clone()  # the next token's position, per batch row
    row_generators_ = list(generators) if generators is not None else None
    step = 0
    while True:  # until every row here (and, with all_done, on every rank) is done
        logits = lm_logits(model.llm, hidden).float()
        gens = [row_generators_[r] for r in active] if row_generators_ is not None and temperature > 0 else None
        tokens = choose_tokens(logits, temperature, top_p, gens) if active else logits.argmax(dim=-1)
        finished: list[int] = []
        token_list = tokens.tolist()  # one device sync per step
        ended_by_eos = torch.isin(tokens, eos).tolist() if len(eos) else [False] * len(active)
        for k, r in enumerate(active):
            if ended_by_eos[k]:
                results[r].finish = "eos"
                finished.append(k)
                continue
            results[r].tokens.append(token_list[k])
            if stop is not None and stop.hit(results[r].tokens):
                results[r].finish = "stop"
                finished.append(k)
        keep = sorted(set(range(len(active))) - set(finished))
        local_done = not keep or step >= max_new_tokens - 1
        if all_done(local_done) if all_done is not None else local_done:
            break
        if local_done:
            keep = []  # at the token limit here, while other ranks go on (a longer limit, longer replies)
        if keep and len(keep) < len(active):  # finished rows leave the batch and the cache
            index = torch.tensor(keep, device=input_ids.device)
            cache.batch_select_indices(index)
            mask, positions, tokens = mask[index], positions[index], tokens[index]
            active = [active[k] for k in keep]
        elif not keep:
            active = []  # this rank is done but others are not: keep stepping, outputs ignored
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        hidden = decoder(
            inputs_embeds=table(tokens[:, None]).to(embeddings.dtype),
            attention_mask=mask,
            position_ids=positions[:, None],
            use_cache=True,
            **cache_arg,
        ).last_hidden_state[:, -1]
        positions = positions + 1
        step += 1
    return results
