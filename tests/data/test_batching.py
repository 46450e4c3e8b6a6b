"""src.data.batching: modality/length grouping, bin packing, and the packed collate."""

from __future__ import annotations

import random
import re

import pytest
import torch

from src.data.batching import (
    collate_packed,
    example_length,
    group_by_modality_length,
    has_images,
    pack,
    packing_efficiency,
    padding_efficiency,
)
from src.data.conversation import IGNORE_INDEX
from src.data.samples import Example

PAD = 0


def make(length: int, images: int = 0, tag: int = 7) -> Example:
    """An example whose ids are all `tag` (so rows show where it went) and whose labels are `tag + 100`."""
    pixels = torch.full((images, 3, 2, 2), float(tag)) if images else None
    return Example(torch.full((length,), tag), torch.full((length,), tag + 100), pixels)


def window(lengths: list[int], image_every: int = 3) -> list[Example]:
    return [make(n, images=int(i % image_every == 0), tag=i + 1) for i, n in enumerate(lengths)]


def long_tailed_lengths(count: int, max_length: int, seed: int = 0) -> list[int]:
    """Mostly short examples and a few long ones (Pareto), as instruction data is."""
    rng = random.Random(seed)
    return [min(max_length, int(24 + 40 * (rng.paretovariate(1.8) - 1))) for _ in range(count)]


def ids(batches) -> list:
    """The examples' identities in batch order (nested as the batches are)."""
    if isinstance(batches, Example):
        return id(batches)
    return [ids(b) for b in batches]


def flatten(batches) -> list[Example]:
    if isinstance(batches, Example):
        return [batches]
    return [e for b in batches for e in flatten(b)]


# ---- group_by_modality_length ----------------------------------------------------------


LENGTHS = [30, 12, 44, 7, 19, 25, 3, 60, 12, 8, 33, 15, 21, 40, 5, 9, 27]  # 6 with images (every 3rd), 11 without


def test_grouping_keeps_modalities_apart_and_uses_every_example_once():
    examples = window(LENGTHS)
    batches = group_by_modality_length(examples, 4, random.Random(0))
    assert sorted(map(id, flatten(batches))) == sorted(map(id, examples))
    assert all(len({has_images(e) for e in batch}) == 1 for batch in batches)
    image_sizes = sorted(len(b) for b in batches if has_images(b[0]))
    text_sizes = sorted(len(b) for b in batches if not has_images(b[0]))
    assert image_sizes == [2, 4] and text_sizes == [3, 4, 4]  # only the last of each modality is smaller


def test_grouping_sorts_lengths_within_and_across_batches_of_a_modality():
    examples = window(LENGTHS)
    batches = group_by_modality_length(examples, 4, random.Random(0))
    for images in (True, False):
        mine = [[example_length(e) for e in b] for b in batches if has_images(b[0]) == images]
        assert all(b == sorted(b, reverse=True) for b in mine)
        # batches hold consecutive runs of the modality's sorted lengths
        joined = [n for b in sorted(mine, key=max, reverse=True) for n in b]
        expected = sorted((example_length(e) for e in examples if has_images(e) == images), reverse=True)
        assert joined == expected
    text = [[example_length(e) for e in b] for b in batches if not has_images(b[0])]
    assert sorted(text, key=max, reverse=True) == [[60, 44, 40, 33], [27, 25, 19, 15], [12, 12, 5]]


def test_grouping_is_deterministic_and_the_seed_shuffles_the_batch_order():
    examples = window(LENGTHS)
    first = group_by_modality_length(examples, 4, random.Random(0))
    assert ids(group_by_modality_length(examples, 4, random.Random(0))) == ids(first)
    other = group_by_modality_length(examples, 4, random.Random(1))
    assert ids(other) != ids(first)
    assert sorted(ids(other)) == sorted(ids(first))  # the same batches, in another order


def test_grouping_pads_less_than_batches_in_window_order():
    examples = window(long_tailed_lengths(256, 512))
    plain = [examples[i : i + 8] for i in range(0, len(examples), 8)]
    grouped = group_by_modality_length(examples, 8, random.Random(0))
    assert padding_efficiency(grouped) > padding_efficiency(plain) + 0.4


def test_grouping_rejects_an_empty_batch_size():
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        group_by_modality_length(window(LENGTHS), 0, random.Random(0))


# ---- pack ----------------------------------------------------------------------------------


def test_best_fit_decreasing_fills_rows_exactly_when_it_can():
    # 40 tokens in rows of 10: 9+1, 7+3, 6+4, 5+5
    examples = window([7, 3, 6, 4, 5, 5, 9, 1])
    batches = pack(examples, 10, 2, random.Random(0))
    rows = [[example_length(e) for e in row] for batch in batches for row in batch]
    assert sorted(map(sorted, rows)) == [[1, 9], [3, 7], [4, 6], [5, 5]]
    assert [len(b) for b in batches] == [2, 2]
    assert packing_efficiency(batches, 10) == 1.0


def test_packing_uses_every_example_once_and_no_row_overflows():
    examples = window(long_tailed_lengths(300, 256, seed=3))
    batches = pack(examples, 256, 4, random.Random(0))
    assert sorted(map(id, flatten(batches))) == sorted(map(id, examples))
    rows = [row for batch in batches for row in batch]
    assert all(sum(map(example_length, row)) <= 256 for row in rows)
    assert sum(len(b) < 4 for b in batches) <= 1  # only one batch may be short
    # best fit is close to the bound no packing can beat
    total = sum(map(example_length, examples))
    assert len(rows) <= -(-total // 256) + 2


def test_packing_beats_padding_on_a_long_tailed_window():
    """Share of computed tokens that are real, measured here (256 examples, median 44 tokens,
    a few up to 512, max_length 512): padded in window order 0.35, grouped by modality and
    length 0.82, packed 0.97 of the rows' capacity."""
    examples = window(long_tailed_lengths(256, 512))
    plain = padding_efficiency([examples[i : i + 8] for i in range(0, len(examples), 8)])
    grouped = padding_efficiency(group_by_modality_length(examples, 8, random.Random(0)))
    packed = packing_efficiency(pack(examples, 512, 8, random.Random(0)), 512)
    assert (round(plain, 2), round(grouped, 2), round(packed, 2)) == (0.35, 0.82, 0.97)


def test_packing_is_deterministic_for_the_same_rng():
    examples = window(long_tailed_lengths(120, 128, seed=5))
    first = pack(examples, 128, 3, random.Random(7))
    assert ids(pack(examples, 128, 3, random.Random(7))) == ids(first)
    assert ids(pack(examples, 128, 3, random.Random(8))) != ids(first)


def test_packing_refuses_an_example_longer_than_a_row():
    message = "example 1 of the window has 11 tokens, more than max_length 10: it fits no row (truncate or drop it before packing)"
    with pytest.raises(ValueError, match=re.escape(message)):
        pack(window([4, 11, 2]), 10, 2, random.Random(0))
    with pytest.raises(ValueError, match="rows_per_batch must be at least 1, got 0"):
        pack(window([4]), 10, 0, random.Random(0))
    assert pack([], 10, 2, random.Random(0)) == []


# ---- collate_packed ------------------------------------------------------------------------


def test_collate_packed_restarts_positions_and_cuts_labels_at_boundaries():
    a, b, c, d = make(3, images=1, tag=1), make(2, tag=2), make(4, images=2, tag=3), make(1, tag=4)
    batch = collate_packed([[a, b, d], [c]], PAD)
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 1, 1, 2, 2, 4], [3, 3, 3, 3, PAD, PAD]]))
    assert torch.equal(batch["position_ids"], torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]))
    no = IGNORE_INDEX
    assert torch.equal(batch["labels"], torch.tensor([[no, 101, 101, no, 102, no], [no, 103, 103, 103, no, no]]))
    assert batch["attention_mask"] is None
    assert batch["seq_lens"] == [[3, 2, 1], [4]]
    # every view, row by row, in example order: a's one, then c's two
    assert batch["pixel_values"].shape == (3, 3, 2, 2)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 3.0, 3.0]


def test_collate_packed_text_only_and_full_rows():
    batch = collate_packed([[make(2, tag=5), make(2, tag=6)], [make(4, tag=7)]], PAD)
    assert batch["pixel_values"] is None
    assert torch.equal(batch["position_ids"], torch.tensor([[0, 1, 0, 1], [0, 1, 2, 3]]))
    assert (batch["input_ids"] != PAD).all()


def test_collate_packed_refuses_empty_rows():
    with pytest.raises(
        ValueError, match="a packed batch needs at least one row, and at least one example in every row"
    ):
        collate_packed([[make(2)], []], PAD)


def test_what_transformers_reads_from_packed_positions():
    """transformers splits a row into examples where positions do not go up by one."""
    from transformers.masking_utils import find_packed_sequence_indices

    batch = collate_packed([[make(3), make(2), make(1)], [make(4)]], PAD)
    segments = find_packed_sequence_indices(batch["position_ids"])
    assert segments.tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 1, 1]]  # the tail is a segment of its own
