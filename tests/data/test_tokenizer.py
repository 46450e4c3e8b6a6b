"""src.data.tokenizer: `<image>` as one special token, the pad token, deterministic across reloads."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from src.data.conversation import IMAGE_TAG
from src.data.tokenizer import prepare_tokenizer

ROOT = Path(__file__).resolve().parents[2]
DEMO_TOKENIZER = ROOT / "data_shards/demo/tokenizer"


def word_tokenizer(unk: bool = True) -> PreTrainedTokenizerFast:
    """Word-level, no `<image>`, no pad: what a plain LM tokenizer looks like to us."""
    words = ["<unk>", "<s>", "</s>", "a", "cat", "image", "<", ">", "sat"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # splits "<image>" into "<", "image", ">"
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>" if unk else None, bos_token="<s>", eos_token="</s>"
    )


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with eos only (no unk, no pad), like GPT-2 or Qwen."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(["a cat sat on the mat", "an image of a cat"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def test_image_is_added_as_one_special_token_that_is_never_split():
    tokenizer = word_tokenizer()
    assert len(tokenizer(IMAGE_TAG, add_special_tokens=False)["input_ids"]) == 3  # "<" "image" ">"
    size = len(tokenizer)
    assert prepare_tokenizer(tokenizer) is tokenizer
    image = tokenizer.convert_tokens_to_ids(IMAGE_TAG)
    assert image == size and len(tokenizer) == size + 1  # appended: the id is known in advance
    added = tokenizer.added_tokens_decoder[image]
    assert added.special and not added.normalized and not added.lstrip and not added.rstrip
    for text in ("a <image> cat", "a<image>cat", "<image>\na cat"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids.count(image) == 1 and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(tokenizer("a <image> cat")["input_ids"], skip_special_tokens=True) == "a cat"


def test_pad_reuses_unk_else_eos_and_no_row_is_added():
    tokenizer = prepare_tokenizer(word_tokenizer())
    assert tokenizer.pad_token == "<unk>"
    tokenizer = byte_tokenizer()
    assert tokenizer.unk_token is None and tokenizer.pad_token is None
    size = len(tokenizer)
    prepare_tokenizer(tokenizer)
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert len(tokenizer) == size + 1  # only <image>
    ids = tokenizer("an image of <image>", add_special_tokens=False)["input_ids"]
    assert ids[-1] == tokenizer.convert_tokens_to_ids(IMAGE_TAG) and ids.count(ids[-1]) == 1


def test_a_tokenizer_without_pad_unk_or_eos_is_refused():
    tokenizer = word_tokenizer(unk=False)
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="no pad, unk or eos token to pad with"):
        prepare_tokenizer(tokenizer)


def test_preparation_is_deterministic_and_survives_save_and_reload(tmp_path):
    word_tokenizer().save_pretrained(tmp_path / "plain")
    first = prepare_tokenizer(AutoTokenizer.from_pretrained(tmp_path / "plain"))
    second = prepare_tokenizer(AutoTokenizer.from_pretrained(tmp_path / "plain"))
    assert first.get_vocab() == second.get_vocab()
    first.save_pretrained(tmp_path / "prepared")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "prepared")
    vocab = reloaded.get_vocab()
    assert prepare_tokenizer(reloaded).get_vocab() == vocab == first.get_vocab()  # a no-op the second time
    assert reloaded.pad_token == "<unk>"
    text = "a <image> cat"
    assert reloaded(text)["input_ids"] == first(text)["input_ids"]


def test_the_demo_tokenizer_is_unchanged():
    tokenizer = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    vocab, pad = tokenizer.get_vocab(), tokenizer.pad_token
    prepare_tokenizer(tokenizer)
    assert tokenizer.get_vocab() == vocab and tokenizer.pad_token == pad == "<pad>"
    assert tokenizer.convert_tokens_to_ids(IMAGE_TAG) == 4


# ---- vocabulary ----------------------------------------------------------------------
