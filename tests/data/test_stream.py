"""src.data.stream: mixtures, resampling, readers over ranks x workers, and exact resume."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from src.data.stream import ShardStream, StreamSource

pytestmark = pytest.mark.usefixtures("single_thread")

KEYS = ("input_ids", "labels", "pixel_values")


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in KEYS)


def stream_of(make_builder, shards, view="mc", **options) -> ShardStream:
    defaults = dict(batch_size=3, pad_id=0, seed=0, shuffle_buffer=4, batches_per_epoch=100, window_batches=2)
    return ShardStream(shards["train"], make_builder(view), **(defaults | options))


def positions(stream: ShardStream, n: int) -> list[tuple[dict, dict]]:
    it = iter(stream)
    return [(b, b.pop("stream")["position"]) for b in (next(it) for _ in range(n))]


@pytest.mark.parametrize("batching", ["shuffle", "modality_length"])
def test_a_stream_resumed_from_any_batch_goes_on_with_the_same_batches(make_builder, shards, batching):
    """mc view: ~4 examples per scene, windows of 6, so samples straddle windows (the hard case)."""
    reference = positions(stream_of(make_builder, shards, batching=batching), 14)
    straddled = [p for _, p in reference if p["skip"]]
    assert straddled, "no window boundary cut a sample: the test would not test carries"
    for k in (0, 1, 2, 5, 8):
        _, after = reference[k]
        resumed = stream_of(make_builder, shards, batching=batching, resume={"0": after})
        got = positions(resumed, 14 - k - 1)
        assert all(same(b, r) for (b, _), (r, _) in zip(got, reference[k + 1 :], strict=True)), f"after batch {k}"
        assert [p for _, p in got] == [p for _, p in reference[k + 1 :]]


def test_resume_crosses_passes_of_the_shards(make_builder, shards):
    """4 shards x 10 scenes of ~4 questions: 14 batches of 12 read more than one pass."""
    reference = positions(stream_of(make_builder, shards, batch_size=12, window_batches=1, shuffle_buffer=8), 14)
    assert reference[-1][1]["sources"][0][0] >= 1  # the stream is in its second pass
    _, after = reference[9]
    resumed = positions(stream_of(make_builder, shards, batch_size=12, window_batches=1, shuffle_buffer=8,
                                  resume={"0": after}), 4)  # fmt: skip
    assert all(same(b, r) for (b, _), (r, _) in zip(resumed, reference[10:], strict=True))


def test_ranks_and_workers_read_disjoint_shards_and_give_equal_batch_counts(make_builder, shards):
    """2 ranks x 2 workers = 4 readers, one shard each per pass; every rank gives the epoch's batches."""
    readers: dict[int, set[str]] = {}
    counts = []
    for rank in (0, 1):
        stream = stream_of(make_builder, shards, view="conversations", rank=rank, world_size=2, batch_size=2,
                           batches_per_epoch=5, window_batches=1, shuffle_buffer=0)  # fmt: skip
        loader = DataLoader(stream, batch_size=None, num_workers=2, multiprocessing_context="fork")
        batches = list(loader)
        counts.append(len(batches))
        for batch in batches:
            info = batch["stream"]
            ids = batch["input_ids"]
            readers.setdefault(info["slot"], set()).update(str(hash(tuple(row.tolist()))) for row in ids)
        assert {b["stream"]["slot"] for b in batches} == {rank * 2, rank * 2 + 1}
    assert counts == [5, 5]
    slots = list(readers.values())
    assert all(not (a & b) for i, a in enumerate(slots) for b in slots[i + 1 :])  # no sample read twice


def test_too_few_shards_for_ranks_x_workers_fails_at_start(make_builder, shards):
    stream = stream_of(make_builder, shards, rank=0, world_size=3)  # 4 shards, 6 readers with 2 workers
    loader = DataLoader(stream, batch_size=None, num_workers=2, multiprocessing_context="fork")
    with pytest.raises(ValueError, match=r"4 training shards cannot feed 6 readers \(ranks x workers\)"):
        next(iter(loader))


def test_resampled_shards_feed_more_readers_than_shards(make_builder, shards):
    source = StreamSource(shards["val"], make_builder("conversations"), resample=True)  # one shard
    batches = [
        next(iter(ShardStream([], None, 2, 0, rank=rank, world_size=3, batches_per_epoch=2, sources=[source])))
        for rank in range(3)
    ]
    assert all(b["input_ids"].shape[0] == 2 for b in batches)


def test_mixture_weights_are_honoured(make_builder, shards, read_tar, image_transform):
    """Captions from val, conversations from train: rows are told apart by their image."""
    from src.data.decode import decode_image

    val_pixels = {
        image_transform(decode_image(members["jpg"])).numpy().tobytes() for _, members in read_tar(shards["val"][0])
    }
    mixture = [
        StreamSource(shards["train"], make_builder("conversations"), weight=3.0, name="chat"),
        StreamSource(shards["val"], make_builder("caption"), weight=1.0, name="captions"),
    ]
    stream = ShardStream([], None, 8, 0, batches_per_epoch=50, sources=mixture, shuffle_buffer=0)
    counts: Counter[str] = Counter()
    for batch in stream:
        for pixels in batch["pixel_values"]:
            counts["caption" if pixels.numpy().tobytes() in val_pixels else "chat"] += 1
    share = counts["chat"] / sum(counts.values())
    assert sum(counts.values()) == 400 and abs(share - 0.75) < 0.07  # 3 sigma at n=400


def test_mixture_weights_must_be_positive(make_builder, shards):
    mixture = [StreamSource(shards["train"], make_builder("conversations"), weight=0.0)]
    with pytest.raises(ValueError, match="mixture weights must be non-negative with a positive sum"):
        next(iter(ShardStream([], None, 2, 0, batches_per_epoch=1, sources=mixture)))


def test_unknown_batching_and_pack_without_length():
    with pytest.raises(ValueError, match=r"unknown batching 'sorted'; choose one of \['shuffle'"):
        ShardStream(["x.tar"], None, 2, 0, batching="sorted")
    with pytest.raises(ValueError, match="batching pack needs pack_length"):
        ShardStream(["x.tar"], None, 2, 0, batching="pack")


class Recorder:
    """Fingerprints of every training batch, by global step."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}

    def __call__(self, trainer, module, batch, batch_idx) -> None:
        self.seen[trainer.global_step] = hash(tuple(batch["input_ids"].flatten().tolist()))


def fit(tmp_path, demo_dir, max_steps: int, every: int, ckpt: str | None = None) -> dict[int, int]:
    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from src.data.datamodule import LlavaDataModule
    from src.training.module import LlavaLitModule

    tiny_vit = {"patch_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}
    tiny_llama = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "num_key_value_heads": 2}  # fmt: skip
    module = LlavaLitModule(
        str(demo_dir / "tokenizer"),
        vision={"name": "vit_tiny_patch16_224", "image_size": 64, "kwargs": tiny_vit},
        llm={"config": tiny_llama},
    )
    data = LlavaDataModule(
        train_shards=f"{demo_dir}/train-{{000000..000003}}.tar", train_view="mc", batch_size=4, num_workers=2,
        window_batches=2, shuffle_buffer=4, samples_per_epoch=5, system_prompt="",
    )  # fmt: skip  # 5 scenes x ~4 questions / 4 = 5 batches per epoch: runs cross epochs
    recorder = Recorder()
    hook = type("Hook", (Callback,), {"on_train_batch_start": lambda self, *a: recorder(*a)})()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1, filename="{step}")
    trainer = Trainer(
        accelerator="cpu", max_steps=max_steps, callbacks=[hook, checkpoints], logger=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, data, ckpt_path=ckpt)
    return recorder.seen


@pytest.mark.slow
@pytest.mark.parametrize("every", [3, 5], ids=["mid-epoch", "epoch-end"])
def test_a_resumed_fit_trains_on_the_batches_the_uninterrupted_fit_saw(tmp_path, demo_dir, every):
    straight = fit(tmp_path / "a", demo_dir, max_steps=2 * every + 2, every=every)
    assert len(straight) == 2 * every + 2
    resumed = fit(tmp_path / "b", demo_dir, max_steps=2 * every + 2, every=every,
                  ckpt=str(tmp_path / "a" / f"step={every}.ckpt"))  # fmt: skip
    assert sorted(resumed) == list(range(every, 2 * every + 2))
    assert resumed == {step: straight[step] for step in resumed}
