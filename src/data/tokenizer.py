"""The kit's two additions to any tokenizer: the `<image>` token and a pad token.

A data concern (the writer, the inspector and the datamodule tokenize with it), kept here so that
the data layer never imports the model to get a tokenizer ready.
"""

from __future__ import annotations

from tokenizers import AddedToken
from transformers import PreTrainedTokenizerBase

from src.data.conversation import IMAGE_TAG


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Adds `<image>` and a pad token when missing; returns the same tokenizer.

    `<image>` becomes a special added token: never split by the model's pre-tokenizer, never
    normalised, dropped by `decode(skip_special_tokens=True)`. It is appended, so its id is
    `len(tokenizer)` before the call (or its existing id, if the vocabulary had it as a plain
    token): the same on every load of the same tokenizer, which is what lets a checkpoint
    reload with the ids it was trained with.

    The pad token, when there is none, reuses unk, else eos, rather than adding a token:
    padded positions are masked out of attention and loss, so any id serves, and a new row
    would only be one more untrained embedding. unk before eos (as LLaVA does for Llama):
    code that masks labels by the pad id would otherwise also mask every eos, and the model
    would never learn to stop.
    """
    if IMAGE_TAG not in tokenizer.get_added_vocab():
        token = AddedToken(IMAGE_TAG, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
        tokenizer.add_special_tokens({"extra_special_tokens": [token]}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is None and tokenizer.eos_token is None:
            raise ValueError("the tokenizer has no pad, unk or eos token to pad with")
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer
