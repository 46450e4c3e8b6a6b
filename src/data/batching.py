"""Batches from a window of examples: grouped by modality and length, or packed into rows.

A right-padded batch computes `batch size x its longest example` tokens; on instruction
data with a long tail of lengths most of them are padding. Two remedies, both working on
a window of examples the stream hands over (the batches of a window depend only on its
examples and the `random.Random` passed in, so a resumed run replays them exactly):

- `group_by_modality_length`: LLaVA's `group_by_modality_length` sampler. Image and
  text-only examples never share a batch, and within a modality examples of similar
  length do, so little is padding; the batch order is then shuffled, so training does not
  meet all long batches together.
- `pack` + `collate_packed`: several examples share a row (padding-free training).
  `position_ids` restart at 0 for every example, and transformers 5 turns that into a
  per-example causal mask (sdpa, eager, flex: `masking_utils.find_packed_sequence_indices`)
  or varlen flash attention (`LlavaModel` flattens the rows), so each example sees only
  itself and its loss and logits are those it has alone.
"""

from __future__ import annotations

import bisect
import random

import torch

from src.data.conversation import IGNORE_INDEX
from src.data.samples import Example


def example_length(example: Example) -> int:
    """Tokens the example takes in a sequence (image placeholders included)."""
    return int(example.input_ids.shape[0])


def has_images(example: Example) -> bool:
    return example.pixel_values is not None and example.pixel_values.shape[0] > 0


def stacked_image_sizes(examples: list[Example]) -> torch.Tensor | None:
    """The examples' `image_sizes` (images, 2) stacked in the order their pixels are, or None when
    no example carries them (every example built by `ExampleBuilder` with an image does)."""
    sizes = [e.image_sizes for e in examples if e.pixel_values is not None and e.image_sizes is not None]
    if not sizes:
        return None
    carried = sum(e.pixel_values is not None for e in examples)
    if len(sizes) != carried:
        raise ValueError(f"{carried - len(sizes)} of {carried} examples with images carry no image_sizes")
    return torch.cat(sizes)


def group_by_modality_length(examples: list[Example], batch_size: int, rng: random.Random) -> list[list[Example]]:
    """Batches of one modality and similar lengths, in an order shuffled by `rng`.

    An image brings hundreds of placeholder tokens, so image and text-only examples differ
    in length far more than examples of one modality do: kept apart, neither pads to the
    other. Within a modality the examples are sorted longest first (ties keep window order)
    and cut into batches of `batch_size`; the last batch of each modality may be smaller.
    Unlike LLaVA's sampler, whose final batch joins the leftovers of both modalities, a
    batch here is always one modality.

    A text-only batch never runs the vision tower and projector, so a trained projector gets
    no gradient in that step: DDP accepts that only with `find_unused_parameters=True`
    (checked: 2-process DDP stops on the step after a text-only batch without it).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    batches: list[list[Example]] = []
    for images in (True, False):
        group = [e for e in examples if has_images(e) == images]
        group.sort(key=example_length, reverse=True)  # stable: deterministic for a given window
        batches.extend(group[start : start + batch_size] for start in range(0, len(group), batch_size))
    rng.shuffle(batches)
    return batches


def _best_fit(order: list[int], lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit bin packing of `order` (indices): each item goes to the row it fills most.

    Fed longest first this is best-fit decreasing, which, like first-fit decreasing, needs
    at most about 11/9 of the fewest rows possible. `free` holds (room left, row) sorted, so
    the best row is one bisection away.
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []
    for index in order:
        n = lengths[index]
        slot = bisect.bisect_left(free, (n, -1))
        if slot == len(free):
            rows.append([index])
            bisect.insort(free, (max_length - n, len(rows) - 1))
        else:
            room, row = free.pop(slot)
            rows[row].append(index)
            bisect.insort(free, (room - n, row))
    return rows


def pack(
    examples: list[Example], max_length: int, rows_per_batch: int, rng: random.Random
) -> list[list[list[Example]]]:
    """Batches of rows, each row examples totalling at most `max_length` tokens.

    Best-fit decreasing fills the rows (equal lengths are ordered by `rng` first, so which of
    them share a row varies from window to window, reproducibly). Rows of similar fill make
    a batch, so the few underfilled rows do not pad the full ones; the batch order is then
    shuffled by `rng`. Every example is used exactly once; the last batch may have fewer
    rows. Image and text-only examples share rows: each sees only itself.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    if rows_per_batch < 1:
        raise ValueError(f"rows_per_batch must be at least 1, got {rows_per_batch}")
    lengths = [example_length(e) for e in examples]
    for index, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(
                f"example {index} of the window has {n} tokens, more than max_length {max_length}: "
                "it fits no row (truncate or drop it before packing)"
            )
    order = list(range(len(examples)))
    rng.shuffle(order)
    order.sort(key=lambda i: lengths[i], reverse=True)
    rows = _best_fit(order, lengths, max_length)
    rows.sort(key=lambda row: sum(lengths[i] for i in row), reverse=True)
    batches = [rows[start : start + rows_per_batch] for start in range(0, len(rows), rows_per_batch)]
    rng.shuffle(batches)
    return [[[examples[i] for i in row] for row in batch] for batch in batches]


def packing_efficiency(batches: list[list[list[Example]]], max_length: int) -> float:
    """Real tokens / the rows' capacity (rows x max_length): how full `pack` filled them.

    A lower bound on the share of real tokens in what `collate_packed` computes, which pads
    each batch only to its longest row.
    """
    rows = [row for batch in batches for row in batch]
    if not rows:
        return 0.0
    tokens = sum(example_length(e) for row in rows for e in row)
    return tokens / (len(rows) * max_length)


def padding_efficiency(batches: list[list[Example]]) -> float:
    """Real tokens / the tokens right-padded batches compute (batch size x longest): the baseline."""
    area = sum(len(batch) * max(map(example_length, batch)) for batch in batches if batch)
    if area == 0:
        return 0.0
    return sum(example_length(e) for batch in batches for e in batch) / area


def collate_packed(rows: list[list[Example]], pad_id: int) -> dict:
    """A padding-free batch: rows of concatenated examples, right-padded to the longest row.

    - `position_ids` restart at 0 for every example, which is what tells the attention
      backends where an example ends. A row's padding tail restarts at 0 too, as a segment
      of its own: no real token attends to it, and it attends only to itself (a fully masked
      query row would give NaN in sdpa).
    - `labels` are -100 at the first token of every example, so the last token of one
      example is never trained to predict the next example; -100 on the padding tail.
    - `attention_mask` is None: transformers derives the per-example causal masks from
      `position_ids` only when no mask is given (an all-ones mask would let examples see
      each other).
    - `pixel_values`: every example's views, row by row, in order, as the placeholders;
      `image_sizes` their images' (height, width), in the same order.
    - `seq_lens`: the examples' lengths per row (padding tails not included).

    Multiple-choice fields are not carried: packed batches are for training.
    """
    if not rows or any(not row for row in rows):
        raise ValueError("a packed batch needs at least one row, and at least one example in every row")
    seq_lens = [[example_length(e) for e in row] for row in rows]
    width = max(sum(lengths) for lengths in seq_lens)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for example in row:
            end = start + example_length(example)
            input_ids[r, start:end] = example.input_ids
            labels[r, start:end] = example.labels
            labels[r, start] = IGNORE_INDEX
            position_ids[r, start:end] = torch.arange(end - start)
            start = end
        position_ids[r, start:] = torch.arange(width - start)
    examples = [e for row in rows for e in row]
    pixels = [e.pixel_values for e in examples if e.pixel_values is not None]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": None,
        "pixel_values": torch.cat(pixels) if pixels else None,
        "image_sizes": stacked_image_sizes(examples),
        "seq_lens": seq_lens,
    }
