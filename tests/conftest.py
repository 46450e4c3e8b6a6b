"""Shared fixtures: one small demo shard set and its tokenizer, built once per session.

Nothing here touches the network: the tokenizer is the word-level demo tokenizer that
src.data.synthetic builds locally, and every model in the tests is randomly initialised.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

IMAGE_TOKENS = 16  # a 64 px image with 16 px patches -> a 4x4 grid


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from src.data.synthetic import SceneSpec, generate_demo

    out = tmp_path_factory.mktemp("demo")
    generate_demo(out, train=40, val=10, test=10, per_shard=10, spec=SceneSpec())
    return out


@pytest.fixture(scope="session")
def tokenizer(demo_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_dir / "tokenizer")


@pytest.fixture(scope="session")
def shards(demo_dir) -> dict[str, list[str]]:
    return {split: [str(p) for p in sorted(demo_dir.glob(f"{split}-*.tar"))] for split in ("train", "val", "test")}


@pytest.fixture(scope="session")
def image_transform():
    from src.model.vision import ImageTransform

    return ImageTransform(64, (0.5,) * 3, (0.5,) * 3)


@pytest.fixture
def make_encoder(tokenizer):
    from src.data.conversation import ConversationEncoder, build_template

    def make(
        template: str = "vicuna_v1", system: str | None = "", image_tokens: int = IMAGE_TOKENS, max_length: int = 2048
    ):
        return ConversationEncoder(
            tokenizer, build_template(template, system), image_tokens=image_tokens, max_length=max_length
        )

    return make


@pytest.fixture
def make_builder(make_encoder, image_transform):
    from src.data.samples import ExampleBuilder

    def make(view: str | list[str] = "mc", blank_images: bool = False, mc_format: str | None = None, **encoder_options):
        options = {} if mc_format is None else {"mc_format": mc_format}
        return ExampleBuilder(
            make_encoder(**encoder_options), image_transform, view, blank_images=blank_images, **options
        )

    return make


def _read_tar(path: str | Path) -> list[tuple[str, dict[str, bytes]]]:
    """Samples of a shard in file order, as (key, {suffix: bytes}), read with plain tarfile."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, suffix = member.name.split(".", 1)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][suffix] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="session")
def read_tar():
    return _read_tar


@pytest.fixture(scope="session")
def jpeg_bytes():
    """Encodes a solid-colour image; returns its bytes."""
    from PIL import Image

    def make(colour=(200, 30, 30), size=(64, 64), fmt="JPEG") -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", size, colour).save(buffer, format=fmt)
        return buffer.getvalue()

    return make


@pytest.fixture
def single_thread():
    """Tiny models on a shared 2-core machine run far faster on one thread; restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _greedy_reference(model, prompt: list[int], pixels, steps: int, eos: int) -> list[int]:
    """Greedy decoding of one prompt on full logits, one token at a time: the plain reference."""
    import torch

    embeds, out = model.embed(torch.tensor([prompt]), pixels), []
    for _ in range(steps):
        token = int(model.llm(inputs_embeds=embeds).logits[0, -1].argmax())
        if token == eos:
            break
        out.append(token)
        embeds = torch.cat([embeds, model.llm.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
    return out


@pytest.fixture
def greedy_reference():
    return _greedy_reference
