"""src.core.constants: one definition of each shared value, equal to the references it stands for."""

from __future__ import annotations

import torch

from src.core import constants


def test_ignore_index_and_image_tag_are_llava_s_own():
    from llava import constants as llava  # the official code, installed without its dependencies

    assert constants.IGNORE_INDEX == llava.IGNORE_INDEX == torch.nn.CrossEntropyLoss().ignore_index
    assert constants.IMAGE_TAG == llava.DEFAULT_IMAGE_TOKEN


def test_every_layer_uses_the_one_definition():
    from src.data import conversation
    from src.model import language, weights
    from src.training import stage

    assert conversation.IGNORE_INDEX is constants.IGNORE_INDEX and conversation.IMAGE_TAG is constants.IMAGE_TAG
    assert stage.PARTS is weights.PARTS is constants.PARTS
    assert language.DTYPES is constants.DTYPES


def test_parts_are_the_model_s_parts_in_forward_order():
    from src.model.llava import LlavaModel

    model = LlavaModel(torch.nn.Identity(), torch.nn.Identity(), torch.nn.Identity(), image_token_id=0)
    assert [name for name, _ in model.named_children()][: len(constants.PARTS)] == list(constants.PARTS)
