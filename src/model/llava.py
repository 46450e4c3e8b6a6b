"""LlavaModel: vision tower -> projector -> features spliced into the LLM's token embeddings.

Plain PyTorch; Lightning lives in `src/training`. Each `<image>` tag has already been
expanded by the data pipeline into as many placeholder ids as the image has tokens, so
splicing is one masked scatter, and a batch may mix samples with and without images.

With `image_mode: anyres` and `anyres_merge: unpad` (LLaVA-NeXT) an image's token count
follows its size: the batch then carries `image_sizes` (images, 2), (height, width) per
image as transformers' LlavaNext takes them, and the views' features are merged per image
(`src.model.anyres`) before the scatter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from src.core.constants import IGNORE_INDEX
from src.model.anyres import AnyresLayout, ImageNewline, grid_side
from src.model.generation import Generated
from src.model.generation import generate as generate_replies
from src.model.language import SDPA_BY_EXAMPLE, lm_logits, packed_segments
from src.model.loss import DEFAULT_CHUNK_SIZE, chunked_cross_entropy

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass
class LlavaOutput:
    loss: torch.Tensor | None
    hidden_states: torch.Tensor  # (batch, length, hidden), the decoder's last layer
    supervised_tokens: int


def uses_flash_attention(config: PretrainedConfig) -> bool:
    """Any flash-attention backend (flash_attention_2/3/4, hub kernels): transformers' own rule."""
    return "flash" in (getattr(config, "_attn_implementation", None) or "")


def flatten_packed(
    embeddings: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor | int]]:
    """Packed rows (R, L, H) as one row (1, R*L, H), plus flash attention's varlen kwargs.

    Every example (and every padding tail) starts where its positions restart at 0, so the
    cumulative lengths are the flat indices of the zeros. transformers would infer the same
    from the flat `position_ids` (batch size 1 only), but re-checks them in every layer
    with a device sync; passing `cu_seq_lens_q/k` and `max_length_q/k` syncs once.
    Reshaping the decoder's output with `.view(R, L, -1)` undoes the flattening.
    """
    rows, length = position_ids.shape
    if bool((position_ids[:, 0] != 0).any()):
        raise ValueError("packed rows must start an example at position 0 in every row")
    flat_positions = position_ids.reshape(1, rows * length)
    starts = (flat_positions[0] == 0).nonzero().flatten()
    total = torch.tensor([rows * length], device=starts.device)
    cu_seq_lens = torch.cat([starts, total]).to(torch.int32)
    longest = int(cu_seq_lens.diff().max())
    varlen = {
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": longest,
        "max_length_k": longest,
    }
    return embeddings.reshape(1, rows * length, embeddings.shape[-1]), flat_positions, varlen


def _dtype_of(module: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype a module computes in: its parameters' (FSDP casts its own inputs)."""
    param = next(module.parameters(), None)
    return default if param is None else param.dtype


class LlavaModel(nn.Module):
    loss_chunk_size: int = DEFAULT_CHUNK_SIZE
    """Supervised positions per chunk of the loss: their logits exist one chunk at a time (`src.model.loss`)."""
    encode_always: bool = False
    """Run the tower and projector on a blank image when a batch has none (`shard_model` sets it).

    Under FSDP every rank must run the same sharded units in the same order, or their
    all-gathers pair up wrongly (gloo aborts, NCCL hangs): a rank holding a text-only batch
    while another holds images would skip the tower's. LLaVA gives text-only samples a blank
    image for the same reason under ZeRO-3. The blank image's features are added times zero.
    """

    def __init__(self, vision: nn.Module, projector: nn.Module, llm: nn.Module, image_token_id: int) -> None:
        super().__init__()
        self.vision = vision
        self.projector = projector
        self.llm = llm
        self.image_token_id = image_token_id
        self.anyres_layout = self._anyres_layout()
        if self.anyres_layout is not None and self.anyres_layout.merge == "unpad":
            # a module of the projector: it trains, freezes, checkpoints and loads with it (`ImageNewline`)
            hidden = llm.get_input_embeddings().embedding_dim
            projector.add_module("anyres", ImageNewline(hidden, self.anyres_layout))

    def _anyres_layout(self) -> AnyresLayout | None:
        """The anyres token layout, or None for the other image modes (one view, `image_tokens` each)."""
        if getattr(self.vision, "image_mode", None) != "anyres":
            return None
        transform = self.vision.image_transform()
        merge = getattr(self.vision, "anyres_merge", "unpad")
        tokens = self.projector.num_tokens
        if merge == "unpad":  # the clear error first: a layout checks only that the count is square
            grid_side(tokens, getattr(self.projector, "prefix_tokens", 0), f"projector {type(self.projector).__name__}")
        return AnyresLayout(transform.size, transform.grids, tokens, merge)

    @property
    def image_tokens(self) -> int:
        """Placeholder tokens one view of an image becomes in the sequence (anyres: see `image_token_count`)."""
        return self.projector.num_tokens

    @property
    def unpads(self) -> bool:
        """Whether images are merged LLaVA-NeXT's way (anyres + unpad), which needs `image_sizes`."""
        return self.anyres_layout is not None and self.anyres_layout.merge == "unpad"

    @property
    def image_token_count(self) -> AnyresLayout | None:
        """anyres: (width, height) -> the image's placeholder tokens, picklable, for the data pipeline;
        None for the other modes, whose images all take `image_tokens` per view."""
        return self.anyres_layout

    def image_spans(
        self, input_ids: torch.Tensor, image_sizes: torch.Tensor | None = None
    ) -> list[tuple[slice, slice]]:
        """Per row of a batch: (its views in `pixel_values`, its images in `image_sizes`), from its placeholders.

        For picking rows out of a batch (`SampleGenerations`): one view per image, `image_tokens` each,
        unless anyres, whose images take `image_token_count(width, height)` tokens and `views_for` views.
        """
        slots = (input_ids == self.image_token_id).sum(dim=1).tolist()
        layout = self.anyres_layout
        if layout is None:
            starts = [sum(slots[:row]) // self.image_tokens for row in range(len(slots) + 1)]
            return [(slice(starts[row], starts[row + 1]),) * 2 for row in range(len(slots))]
        if image_sizes is None:
            raise ValueError("anyres rows need image_sizes to tell which views are whose")
        sizes = [(int(w), int(h)) for h, w in image_sizes.tolist()]
        spans, view, image = [], 0, 0
        for wanted in slots:
            first_view, first_image = view, image
            while wanted > 0:
                if image == len(sizes):
                    raise ValueError("the batch has more image placeholder tokens than its image_sizes make")
                wanted -= layout.tokens_for(*sizes[image])
                view += layout.views_for(*sizes[image])
                image += 1
            if wanted:
                raise ValueError("a row's image placeholder tokens do not end where an image's do")
            spans.append((slice(first_view, view), slice(first_image, image)))
        return spans

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, 3, H, W) -> (images, tokens, llm hidden)."""
        pixel_values = pixel_values.to(_dtype_of(self.vision, pixel_values.dtype))  # a frozen tower may be bf16
        if any(p.requires_grad for p in self.vision.parameters()):
            features = self.vision(pixel_values)
        else:
            with torch.no_grad():  # a frozen tower needs no activations kept for backward
                features = self.vision(pixel_values)
        return self.projector(features.to(_dtype_of(self.projector, features.dtype)))

    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """(views, 3, H, W) -> (image tokens, llm hidden), in placeholder order: every view's tokens,
        or under anyres + unpad each image's views merged (`src.model.anyres`) by its `image_sizes`."""
        features = self.encode_images(pixel_values)
        if not self.unpads:
            return features.reshape(-1, features.shape[-1])
        if image_sizes is None:
            raise ValueError(
                "image_mode anyres with anyres_merge unpad needs image_sizes (images, 2), each image's (height, "
                "width), to merge its views; batches from the kit's data pipeline carry them"
            )
        return self.projector.anyres(features, image_sizes)

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_sizes: torch.Tensor | None = None
    ) -> torch.Tensor:
        embeddings = self.llm.get_input_embeddings()(input_ids)
        slots = input_ids == self.image_token_id
        n_slots = int(slots.sum())
        if pixel_values is None or pixel_values.shape[0] == 0:
            if n_slots:
                raise ValueError(f"{n_slots} image placeholder tokens but no images in the batch")
            if self.encode_always:
                blank = self.image_features(*self._blank_image(embeddings.device))
                return embeddings + blank.sum().to(embeddings.dtype) * 0
            return embeddings + self._touch_image_path() if torch.is_grad_enabled() else embeddings
        features = self.image_features(pixel_values, image_sizes)
        if features.shape[0] != n_slots:
            views = pixel_values.shape[0]
            images = f"{image_sizes.shape[0]} images ({views} views)" if self.unpads else f"{views} images"
            raise ValueError(
                f"{images} make {features.shape[0]} tokens but the batch has {n_slots} image placeholder tokens"
            )
        # row-major order of the slots = sample order, then image order within a sample
        return embeddings.masked_scatter(slots.unsqueeze(-1), features.to(embeddings.dtype))

    def _blank_image(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A black image of the input size, as pixels and (for unpad) its size: it runs every unit a real one does."""
        size = self.vision.image_transform().size
        views = 1 if self.anyres_layout is None else self.anyres_layout.views_for(size, size)
        sizes = torch.tensor([[size, size]], device=device) if self.unpads else None
        return torch.zeros(views, 3, size, size, device=device), sizes

    def _touch_image_path(self) -> torch.Tensor | float:
        """A zero that depends on every trainable parameter of the tower and projector.

        A text-only batch never runs them, and DDP (or FSDP) then waits forever for their
        gradients, or fails on the next step; LLaVA feeds a dummy image for the same reason.
        Touching one element of each parameter costs nothing and gives them zero gradients.
        """
        touched = [
            p.view(-1)[0] for part in (self.vision, self.projector) for p in part.parameters() if p.requires_grad
        ]
        return torch.stack(touched).sum() * 0.0 if touched else 0.0

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> LlavaOutput:
        """`position_ids` without an `attention_mask` is a packed batch (`src.data.batching`).

        transformers builds a causal mask per example from the restarting positions themselves
        (eager, flex, sdpa); sdpa (`sdpa_by_example`) is also handed each row's example spans, so
        it attends within each example without computing the masked rest of the row; flash
        attention infers examples from positions only for a single row, so for it the rows are
        run as one row, with the examples' boundaries handed over (`flatten_packed`).
        `image_sizes`: (images, 2) (height, width), needed by anyres + unpad only.
        """
        embeddings = self.embed(input_ids, pixel_values, image_sizes)
        decoder = self.llm.get_decoder()
        packed = position_ids is not None and attention_mask is None
        if packed and uses_flash_attention(decoder.config):
            flat, flat_positions, varlen = flatten_packed(embeddings, position_ids)
            hidden = decoder(inputs_embeds=flat, position_ids=flat_positions, use_cache=False, **varlen)
            hidden = hidden.last_hidden_state.view(embeddings.shape[0], embeddings.shape[1], -1)
        else:
            # sdpa runs a packed row example by example when handed the spans (`sdpa_by_example`)
            by_example = packed and decoder.config._attn_implementation == SDPA_BY_EXAMPLE
            spans = {"packed_segments": packed_segments(position_ids)} if by_example else {}
            hidden = decoder(
                inputs_embeds=embeddings, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                **spans,
            ).last_hidden_state  # fmt: skip
        if labels is None:
            return LlavaOutput(None, hidden, 0)
        loss, count = self.supervised_loss(hidden, labels)
        return LlavaOutput(loss, hidden, count)

    def supervised_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over supervised tokens; logits exist only at those positions.

        Most positions of a LLaVA batch are image or prompt tokens: projecting them all to
        the vocabulary would cost memory and time for nothing. Even those are computed a
        chunk at a time and recomputed in backward, so no (tokens x vocab) tensor is kept.
        """
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        count = int(keep.sum())
        if count == 0:
            return hidden.sum() * 0.0, 0  # keeps the graph (and DDP) whole
        loss = chunked_cross_entropy(
            hidden[:, :-1][keep], targets[keep], lambda h: lm_logits(self.llm, h), self.loss_chunk_size
        )
        return loss, count

    def logits_at(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Next-token logits at one position per row: (batch,) -> (batch, vocab)."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return lm_logits(self.llm, hidden[rows, positions]).float()

    @torch.no_grad()
    def score_candidates(
        self,
        input_ids: torch.Tensor,
        prompt_lengths: torch.Tensor,
        pixel_values: torch.Tensor | None,
        candidates: list[list[list[int]]],
        image_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Log-likelihood of each candidate reply after each row's prompt: (rows, max options).

        The images are encoded once; every candidate continues its row's prompt embeddings.
        Rows with fewer candidates are padded with -inf.
        """
        embeddings = self.embed(input_ids, pixel_values, image_sizes)
        table = self.llm.get_input_embeddings()
        pieces, targets, owners = [], [], []
        for row, options in enumerate(candidates):
            n = int(prompt_lengths[row])
            for k, ids in enumerate(options):
                ids_t = torch.tensor(ids, dtype=torch.long, device=input_ids.device)
                pieces.append(torch.cat([embeddings[row, :n], table(ids_t).to(embeddings.dtype)]))
                targets.append(torch.cat([ids_t.new_full((n,), IGNORE_INDEX), ids_t]))
                owners.append((row, k))
        scores = torch.full((len(candidates), max(map(len, candidates))), float("-inf"), device=input_ids.device)
        if not pieces:
            return scores
        length = max(p.shape[0] for p in pieces)
        batch = embeddings.new_zeros(len(pieces), length, embeddings.shape[2])
        labels = torch.full((len(pieces), length), IGNORE_INDEX, dtype=torch.long, device=input_ids.device)
        mask = torch.zeros((len(pieces), length), dtype=torch.long, device=input_ids.device)
        for i, (piece, target) in enumerate(zip(pieces, targets, strict=True)):
            batch[i, : piece.shape[0]], labels[i, : piece.shape[0]], mask[i, : piece.shape[0]] = piece, target, 1
        hidden = self.llm.get_decoder()(inputs_embeds=batch, attention_mask=mask, use_cache=False).last_hidden_state
        shifted = labels[:, 1:]
        keep = shifted != IGNORE_INDEX
        log_probs = torch.log_softmax(lm_logits(self.llm, hidden[:, :-1][keep]).float(), dim=-1)
        token_scores = log_probs.gather(1, shifted[keep].unsqueeze(1)).squeeze(1)
        per_piece = torch.zeros(len(pieces), device=input_ids.device).index_add_(0, keep.nonzero()[:, 0], token_scores)
        for i, (row, k) in enumerate(owners):
            scores[row, k] = per_piece[i]
        return scores

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        prompt_lengths: torch.Tensor,
        pixel_values: torch.Tensor | None,
        max_new_tokens: int,
        eos_token_id: int,
        all_done: Callable[[bool], bool] | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> list[list[int]]:
        """Greedy replies to right-padded prompts (row r's prompt: `input_ids[r, :prompt_lengths[r]]`),
        eos stripped. One generation path: `src.model.generation.generate` (left padding, KV cache),
        which also samples and stops at strings. `all_done`: see there (FSDP: ranks step together)."""
        replies = generate_replies(
            self, input_ids, prompt_lengths, pixel_values, max_new_tokens, eos_token_id, all_done=all_done,
            image_sizes=image_sizes,
        )  # fmt: skip
        return [reply.tokens for reply in replies]

    @torch.no_grad()
    def reply(self, *args, **kwargs) -> list[Generated]:
        """`src.model.generation.generate` on this model, as a method: under FSDP it is registered as
        a forward method (`shard_model`), so the root's own parameters (embeddings, final norm,
        head) are gathered for the whole generation, as `forward` gathers them."""
        return generate_replies(self, *args, **kwargs)
