"""src.training.sharding: activation checkpointing wraps every trained block of every tower type
(timm ViT and CNN, transformers CLIP / SigLIP / SigLIP2 / DINOv2 (+ registers), fused) and of the
LLM, and changes neither the loss nor the gradients. (FSDP2 itself: test_distributed.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from src.data.conversation import IGNORE_INDEX
from src.training.module import FreezeConfig, LlavaLitModule
from src.training.sharding import FSDPConfig, checkpoint_blocks, wrap_in_place

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = str(ROOT / "data_shards/demo/tokenizer")
LLM = {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 2, "num_key_value_heads": 2}}  # fmt: skip
# 32 px in 8 px patches: a 4x4 grid; feature_layer -2 keeps 2 of 3 blocks
LAYERS = dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2)
HF = {
    "clip": dict(model_type="clip_vision_model", image_size=32, patch_size=8, intermediate_size=32, **LAYERS),
    "siglip": dict(model_type="siglip_vision_model", image_size=32, patch_size=8, intermediate_size=32, **LAYERS),
    "siglip2": dict(model_type="siglip2_vision_model", num_patches=16, patch_size=8, intermediate_size=32, **LAYERS),
    "dinov2": dict(model_type="dinov2", image_size=32, patch_size=8, mlp_ratio=2, **LAYERS),
    "dinov2_registers": dict(
        model_type="dinov2_with_registers", image_size=32, patch_size=8, mlp_ratio=2, num_register_tokens=2, **LAYERS
    ),
}
TOWERS = {
    "timm_vit": {"name": "vit_tiny_patch16_224", "image_size": 32,
                 "kwargs": {"patch_size": 8, "embed_dim": 16, "depth": 3, "num_heads": 2}},
    "timm_convnext": {"name": "convnext_atto", "image_size": 64, "feature_layer": -2,
                      "kwargs": {"dims": (8, 16, 24, 32), "depths": (1, 1, 1, 1)}},
    **{f"hf_{family}": {"type": "hf", "config": config} for family, config in HF.items()},
    "fused": {"type": "fused", "towers": [{"type": "hf", "config": HF["dinov2"]},
                                          {"type": "hf", "config": HF["siglip"] | {"patch_size": 4,
                                                                                   "image_size": 16}}]},
}  # fmt: skip
FULL = FreezeConfig(vision="full", projector="full", llm="full")


def build(vision: dict, checkpointing: bool, freeze: FreezeConfig = FULL, llm: dict = LLM) -> LlavaLitModule:
    torch.manual_seed(0)
    module = LlavaLitModule(
        TOKENIZER, vision=vision, llm=llm, freeze=freeze, fsdp=FSDPConfig(activation_checkpointing=checkpointing)
    )
    module.configure_model()
    return module


def batch(module: LlavaLitModule) -> dict[str, torch.Tensor]:
    """Two rows with one image each, of different lengths (padded), the last tokens supervised."""
    size = module.data_spec()["image_transform"].size
    tokens = module.model.image_tokens
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 40, (2, tokens + 9), generator=generator)
    ids[:, 1 : 1 + tokens] = module.image_token_id
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    labels = torch.where(torch.arange(ids.shape[1]) >= tokens + 4, ids, IGNORE_INDEX)
    labels[mask == 0] = IGNORE_INDEX
    pixels = torch.randn(2, 3, size, size, generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


def loss_and_gradients(module: LlavaLitModule, data: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = module(data).loss
    loss.backward()
    grads = {
        name.replace("_checkpoint_wrapped_module.", ""): p.grad
        for name, p in module.model.named_parameters()
        if p.requires_grad
    }
    return loss.detach(), grads


@pytest.mark.parametrize("tower", list(TOWERS))
def test_every_trained_block_of_every_tower_type_is_checkpointed_and_nothing_changes(tower):
    plain, wrapped = build(TOWERS[tower], False), build(TOWERS[tower], True)
    blocks = wrapped.model.vision.wrap_modules()
    layers = list(wrapped.model.llm.get_decoder().layers)
    assert len(blocks) >= 2 and all(isinstance(block, CheckpointWrapper) for block in blocks + layers)
    assert not any(isinstance(m, CheckpointWrapper) for m in plain.model.modules())
    assert wrapped.model.state_dict().keys() == plain.model.state_dict().keys()  # checkpoints keep their keys
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):  # the block inside each wrapper starts in forward and again in backward
        # (a pre-hook: the recomputation stops as soon as it has what backward needs, before forward hooks)
        block._checkpoint_wrapped_module.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    data = batch(plain)
    loss, grads = loss_and_gradients(plain, data)
    checkpointed_loss, checkpointed_grads = loss_and_gradients(wrapped, data)
    assert calls == [2] * len(blocks)
    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=0)
    assert checkpointed_grads.keys() == grads.keys()
    vision_grads = [name for name, grad in grads.items() if name.startswith("vision.") and grad is not None]
    assert vision_grads  # the tower trains, so its checkpointed blocks are recomputed in backward
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_only_trained_blocks_are_checkpointed():
    """partial training: the tower's last block and the LLM's last layer train, and only they are wrapped."""
    freeze = FreezeConfig(vision="partial", vision_blocks=1, projector="full", llm="partial", llm_blocks=1)
    module = build(TOWERS["hf_clip"], True, freeze)
    wrapped = [isinstance(block, CheckpointWrapper) for block in module.model.vision.wrap_modules()]
    assert wrapped == [False, True]
    assert [isinstance(layer, CheckpointWrapper) for layer in module.model.llm.get_decoder().layers] == [False, True]
    frozen = build(TOWERS["fused"], False, FreezeConfig(vision="frozen", projector="full", llm="frozen"))
    assert checkpoint_blocks(frozen.model) == {"vision": 0, "llm": 0}


def test_wrap_in_place_refuses_a_module_outside_the_model():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="1 of 1 blocks are not submodules of the model"):
        wrap_in_place(model, [torch.nn.Linear(2, 2)], lambda m: m)


def test_decoder_layers_are_not_checkpointed_twice():
    """With model.llm.gradient_checkpointing, transformers recomputes the decoder layers itself: the
    activation-checkpointing wrapper takes only the tower's blocks, and each trained layer's forward
    runs twice (forward, recomputation), not three times."""
    module = build(TOWERS["timm_vit"], True, llm=LLM | {"gradient_checkpointing": True})
    layers = list(module.model.llm.get_decoder().layers)
    assert not any(isinstance(layer, CheckpointWrapper) for layer in layers)
    assert all(isinstance(block, CheckpointWrapper) for block in module.model.vision.wrap_modules())
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        # inside the layer's forward, which transformers checkpoints (its hooks stay outside)
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    module.train()
    module(batch(module)).loss.backward()
    assert calls == [2] * len(layers)
