"""Tiny models for tests that train, generate or predict end to end (import: `from tiny_models import ...`)."""

from __future__ import annotations

from pathlib import Path


def tiny_lit_module(
    demo_dir: Path, *, patch_size: int = 32, layers: int = 2, positions: int = 512, seed: int = 0, **module_options
):
    """A LlavaLitModule small enough to train and generate in seconds: a 2-block ViT on 64 px images
    (32 px patches: 4 image tokens), LLaVA-1.5's MLP projector, a Llama of width 32, the demo tokenizer."""
    import torch

    from src.model.language import LLMConfig
    from src.model.projector import ProjectorConfig
    from src.model.vision import VisionConfig
    from src.training.module import LlavaLitModule

    torch.manual_seed(seed)
    return LlavaLitModule(
        tokenizer=str(demo_dir / "tokenizer"),
        vision=VisionConfig(
            name="vit_tiny_patch16_224",
            image_size=64,
            kwargs=dict(patch_size=patch_size, embed_dim=16, depth=2, num_heads=2),
        ),
        projector=ProjectorConfig("mlp", {"depth": 2}),
        llm=LLMConfig(
            config=dict(
                model_type="llama",
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=layers,
                num_attention_heads=2,
                num_key_value_heads=2,
                max_position_embeddings=positions,
            ),
            attn_implementation="sdpa",
        ),
        **module_options,
    )


def tiny_llava_model(llm_config: dict, vocab_size: int, image_token_id: int, attn_implementation: str = "sdpa"):
    """A bare LlavaModel in eval mode: a 2-block ViT on 32 px images (16 px patches: 4 image tokens),
    LLaVA-1.5's MLP projector to width 32, the decoder `llm_config` describes; seeded, so every call
    with the same arguments gives the same weights (for comparing attention backends)."""
    import torch

    from src.model.language import LLMConfig, build_llm
    from src.model.llava import LlavaModel
    from src.model.projector import ProjectorConfig, build_projector
    from src.model.vision import TimmVisionTower, VisionConfig

    torch.manual_seed(0)
    vision = TimmVisionTower(
        VisionConfig(
            name="vit_tiny_patch16_224", image_size=32, kwargs=dict(patch_size=16, embed_dim=16, depth=2, num_heads=2)
        )
    )
    projector = build_projector(
        ProjectorConfig("mlp", {"depth": 2}), vision.hidden_size, 32, vision.grid, vision.num_prefix_tokens
    )
    llm = build_llm(LLMConfig(config=dict(llm_config), attn_implementation=attn_implementation), vocab_size=vocab_size)
    return LlavaModel(vision, projector, llm, image_token_id=image_token_id).eval()


def tiny_hf_vision_configs(width: int, intermediate: int) -> dict[str, dict]:
    """Inline configs of every transformers vision model the `hf` tower reads (`vision.config`):
    3 layers of `width`, 32 px images in 8 px patches, so a 4x4 grid each."""
    layers = dict(hidden_size=width, num_hidden_layers=3, num_attention_heads=2)
    grid = dict(image_size=32, patch_size=8)
    return {
        "clip": dict(model_type="clip_vision_model", intermediate_size=intermediate, **grid, **layers),
        "siglip": dict(model_type="siglip_vision_model", intermediate_size=intermediate, **grid, **layers),
        "siglip2": dict(
            model_type="siglip2_vision_model", num_patches=16, patch_size=8, intermediate_size=intermediate, **layers
        ),
        "dinov2": dict(model_type="dinov2", mlp_ratio=intermediate // width, **grid, **layers),
        "dinov2_registers": dict(
            model_type="dinov2_with_registers", mlp_ratio=intermediate // width, num_register_tokens=2, **grid, **layers
        ),
    }
