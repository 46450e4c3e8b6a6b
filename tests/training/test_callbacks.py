"""TrainingTelemetry and SampleGenerations: batch counts and gradient norm by hand, then one tiny
`Trainer.fit` whose TensorBoard event file is read back (the FLOPs model alone: test_flops.py).

The fit runs under a controlled clock (the telemetry module's `time` is replaced, nothing
else's): the "compute" and "loader" phases advance it by fixed amounts, so step times, data
wait and every rate are exact numbers instead of timing noise.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from src.data.conversation import IGNORE_INDEX
from src.data.datamodule import LlavaDataModule
from src.model.vision import VisionConfig
from src.training import telemetry as telemetry_module
from src.training.callbacks import SampleGenerations, TrainingTelemetry
from src.training.flops import flops_model_of
from src.training.module import FreezeConfig, LlavaLitModule, OptimizerConfig, warmup_cosine
from src.training.sample_generations import unnormalise
from src.training.telemetry import BatchCounts, gradient_norm

TINY = {
    "vision": VisionConfig(
        name="vit_tiny_patch16_224", image_size=64, kwargs={"patch_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}
    ),
    "llm": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "num_key_value_heads": 2}},
}  # fmt: skip
COMPUTE_S, WAIT_S, VALIDATION_S = 0.25, 0.5, 10.0
PEAK = 1e9
STEPS = 4


# ---- batches and gradients ------------------------------------------------------------------


def test_batch_counts_exclude_padding_and_count_packed_examples():
    labels = torch.tensor(
        [[IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX], [IGNORE_INDEX, 7, IGNORE_INDEX, -100, -100]]
    )
    padded = {
        "input_ids": torch.zeros(2, 5, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]),
        "labels": labels,
        "pixel_values": torch.zeros(3, 3, 8, 8),
    }
    assert BatchCounts.of(padded) == BatchCounts(tokens=6, samples=2, images=3, squared_lengths=16 + 4, supervised=3)
    packed = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": None, "labels": labels,
              "seq_lens": [[2, 3], [4]], "pixel_values": None}  # fmt: skip
    assert BatchCounts.of(packed) == BatchCounts(
        tokens=9, samples=3, images=0, squared_lengths=4 + 9 + 16, supervised=3
    )
    assert BatchCounts.of({"input_ids": torch.zeros(2, 5, dtype=torch.long)}) == BatchCounts(10, 2, 0, 50, 0)
    assert BatchCounts.of({"skipped": {"bad_image": 1}, "empty": True}) == BatchCounts(0, 0, 0, 0, 0)


def test_gradient_norm_is_the_norm_of_all_gradients_together():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    net(torch.randn(5, 4)).pow(2).sum().backward()
    grads = [p.grad for p in net.parameters()]
    by_hand = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    assert gradient_norm(grads) == pytest.approx(by_hand, rel=1e-6)


def _sharded_norm(rank: int, world: int, port: int, results) -> None:
    """One rank of the FSDP2-style case: every gradient a DTensor sharded over ranks (one shard
    uneven), beside a plain gradient that DDP would already have made equal on every rank."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        full = [torch.randn(6, 4), torch.randn(5)]
        plain = torch.randn(3)
        mesh = init_device_mesh("cpu", (world,))
        shards = [distribute_tensor(g, mesh, [Shard(0)]) for g in full]
        assert shards[1].to_local().numel() < 5  # really split
        results.put(
            (rank, gradient_norm([*shards, plain]), float(torch.cat([full[0].flatten(), full[1], plain]).norm()))
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gradient_norm_of_fsdp2_dtensor_shards_is_the_global_norm_on_every_rank():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # forked, the ranks start with everything imported (spawned, each would import it all again)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=_sharded_norm, args=(rank, 2, port, results)) for rank in range(2)]
    for worker in workers:
        worker.start()
    got = sorted(results.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0]
    for _, norm, by_hand in got:
        assert norm == pytest.approx(by_hand, rel=1e-6)


class _FakeLogger:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.logged.append((step, metrics))


def test_window_rates_and_gradient_accumulation_without_a_trainer(monkeypatch):
    """Two batches per optimizer step (accumulation): one step = both batches' tokens and
    times; with window 2 the rates cover the last two steps, logged every step."""
    clock = SimpleNamespace(t=0.0)
    monkeypatch.setattr(telemetry_module, "time", SimpleNamespace(perf_counter=lambda: clock.t))
    logger = _FakeLogger()
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=1, loggers=[logger], world_size=1, optimizers=[])
    module = SimpleNamespace(device=torch.device("cpu"), log=lambda *a, **k: None, parameters=lambda: [])
    telemetry = TrainingTelemetry(window=2)
    telemetry.flops, telemetry.device_peak = None, None
    telemetry.on_train_epoch_start(trainer, module)

    def batch(tokens: int) -> dict:
        return {"input_ids": torch.zeros(1, tokens, dtype=torch.long), "attention_mask": torch.ones(1, tokens)}

    for step, (tokens, compute, wait) in enumerate([(10, 1.0, 0.0), (30, 2.0, 1.0), (50, 1.0, 3.0)]):
        for half in (0, 1):  # two micro-batches; the optimizer steps after the second
            clock.t += wait if half == 0 else 0.0
            telemetry.on_train_batch_start(trainer, module, batch(tokens), 0)
            clock.t += compute / 2
            trainer.global_step = step + half
            telemetry.on_train_batch_end(trainer, module, None, batch(tokens), 0)
    steps = [metrics for _, metrics in logger.logged]
    assert [step for step, _ in logger.logged] == [0, 1, 2]
    assert steps[0]["perf/tokens_per_s"] == 20 / 1.0
    assert steps[1]["perf/tokens_per_s"] == (20 + 60) / (1.0 + 3.0)
    assert steps[2]["perf/tokens_per_s"] == (60 + 100) / (3.0 + 4.0)  # the first step left the window
    assert steps[2]["perf/data_wait_fraction"] == (1.0 + 3.0) / 7.0
    assert steps[2]["perf/step_time_s"] == 3.5 and steps[2]["perf/tokens_per_step"] == 80


# ---- one tiny fit, read back from its event file --------------------------------------------


class _Clock:
    """Stands in for `time` in the telemetry module; advanced by `_Phases`."""

    def __init__(self) -> None:
        self.t = 1000.0

    def perf_counter(self) -> float:
        return self.t


class _Phases(Callback):
    """Advances the clock: COMPUTE_S inside every step, WAIT_S after its end (the telemetry's
    end stamp is taken first: callbacks run in list order), VALIDATION_S per validation batch."""

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock

    def on_after_backward(self, trainer, pl_module) -> None:
        self.clock.t += COMPUTE_S

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.t += WAIT_S

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.clock.t += VALIDATION_S


class _Record(Callback):
    """What the telemetry should have seen, computed independently."""

    def __init__(self) -> None:
        self.counts: list[BatchCounts] = []
        self.grad_norms: list[float] = []
        self.val_batches: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        mask, labels = batch["attention_mask"], batch["labels"]
        lengths = mask.sum(dim=1).tolist()
        self.counts.append(BatchCounts(
            tokens=sum(lengths), samples=len(lengths), images=batch["pixel_values"].shape[0],
            squared_lengths=sum(n * n for n in lengths), supervised=int((labels[:, 1:] != IGNORE_INDEX).sum()),
            image_tokens=int((batch["input_ids"] == pl_module.image_token_id).sum()),
        ))  # fmt: skip

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = torch.cat([p.grad.flatten() for p in pl_module.parameters() if p.grad is not None])
        self.grad_norms.append(float(grads.double().norm()))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and not trainer.sanity_checking:
            self.val_batches.append({k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)})


@pytest.fixture(scope="module")
def fit(demo_dir, shards, tmp_path_factory):
    seed_everything(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    clock, record = _Clock(), _Record()
    optimizer = OptimizerConfig(lr=1e-3, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.01)
    module = LlavaLitModule(str(demo_dir / "tokenizer"), freeze=FreezeConfig("full", "full", "full"),
                            optimizer=optimizer, max_new_tokens=3, **TINY)  # fmt: skip
    data = LlavaDataModule(
        train_shards=shards["train"], val_shards=shards["val"], train_view=["mc", "caption"], eval_view="mc",
        mc_format="option", system_prompt="", batch_size=4, num_workers=0, shuffle_buffer=0, samples_per_epoch=16,
    )  # fmt: skip
    root = tmp_path_factory.mktemp("telemetry")
    trainer = Trainer(
        accelerator="cpu", max_steps=STEPS, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=1,
        num_sanity_val_steps=0, log_every_n_steps=1, gradient_clip_val=1e-3, enable_checkpointing=False,
        enable_progress_bar=False, logger=TensorBoardLogger(root), deterministic=True,
        callbacks=[TrainingTelemetry(peak_flops=PEAK), SampleGenerations(num_samples=2), _Phases(clock), record],
    )  # fmt: skip
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(telemetry_module, "time", clock)
            trainer.fit(module, data)
    finally:
        torch.set_num_threads(threads)
    (events,) = Path(trainer.logger.log_dir).glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    return SimpleNamespace(module=module, trainer=trainer, record=record, acc=acc, scalars=scalars)


def test_every_step_logs_throughput_wait_and_memory_at_the_loss_s_step(fit):
    s = fit.scalars
    assert sorted(s["perf/tokens_per_s"]) == sorted(s["train/loss"]) == list(range(STEPS))
    for step in range(STEPS):
        counts = fit.record.counts[step]  # one batch per step
        # the first step waited for nothing on the controlled clock; each later one for WAIT_S,
        # the validation between steps 1 and 2 (10 s) excluded
        wait = 0.0 if step == 0 else WAIT_S
        seconds = COMPUTE_S + wait
        assert s["perf/step_time_s"][step] == pytest.approx(seconds)
        assert s["perf/data_wait_s"][step] == pytest.approx(wait)
        assert s["perf/data_wait_fraction"][step] == pytest.approx(wait / seconds)
        assert 0.0 <= s["perf/data_wait_fraction"][step] <= 1.0
        assert s["perf/tokens_per_step"][step] == counts.tokens
        assert s["perf/tokens_per_s"][step] == pytest.approx(counts.tokens / seconds)
        assert s["perf/tokens_per_s"][step] == pytest.approx(
            s["perf/tokens_per_step"][step] / s["perf/step_time_s"][step]
        )
        assert s["perf/samples_per_s"][step] == pytest.approx(4 / seconds)
        assert s["perf/images_per_s"][step] == pytest.approx(counts.images / seconds)
        assert counts.image_tokens > 0
        assert s["perf/image_tokens_per_s"][step] == pytest.approx(counts.image_tokens / seconds)
        assert s["perf/image_tokens_per_sample"][step] == pytest.approx(counts.image_tokens / 4)
    # the progress bar shows the last rate and the module's loss
    bar = fit.trainer.progress_bar_metrics
    assert bar["tok/s"] == pytest.approx(s["perf/tokens_per_s"][STEPS - 1]) and "train/loss" in bar
    peaks = [s["perf/peak_memory_gb"][step] for step in range(STEPS)]
    assert 0.05 < peaks[0] <= peaks[-1] < 64  # this process's peak RSS, which never falls


def test_learning_rate_per_group_follows_the_schedule(fit):
    groups = ["vision", "vision/no_decay", "projector", "projector/no_decay", "llm", "llm/no_decay"]
    assert {tag.removeprefix("lr/") for tag in fit.scalars if tag.startswith("lr/")} == set(groups)
    for group in groups:
        for step in range(STEPS):
            expected = 1e-3 * warmup_cosine(step, 2, STEPS, 0.1)
            assert fit.scalars[f"lr/{group}"][step] == pytest.approx(expected, rel=1e-6)


def test_grad_norm_is_the_norm_before_clipping(fit):
    norms = fit.scalars["perf/grad_norm"]
    assert [norms[step] for step in range(STEPS)] == pytest.approx(fit.record.grad_norms, rel=1e-5)
    assert min(fit.record.grad_norms) > 10 * fit.trainer.gradient_clip_val  # the clip really cut them afterwards


def test_mfu_from_the_flops_model_and_the_given_peak(fit):
    model = flops_model_of(fit.module)
    for step in range(STEPS):
        c = fit.record.counts[step]
        flops = model.step_flops(c.tokens, c.squared_lengths, c.supervised, c.images)
        seconds = COMPUTE_S + (0.0 if step == 0 else WAIT_S)
        assert fit.scalars["perf/mfu"][step] == pytest.approx(flops / seconds / PEAK, rel=1e-6)
        assert fit.scalars["perf/tflops_per_s_per_device"][step] == pytest.approx(flops / seconds / 1e12, rel=1e-6)


def test_sample_generations_log_the_image_the_answer_and_the_reference(fit):
    module, acc = fit.module, fit.acc
    assert sorted(acc.Tags()["images"]) == ["samples/0/image", "samples/1/image"]
    # two validations, after optimizer steps 2 and 4: logged at the steps of their val/ scalars
    assert [e.step for e in acc.Images("samples/0/image")] == sorted(fit.scalars["val/loss"]) == [1, 3]
    batch = fit.record.val_batches[-1]
    transform = module.model.vision.image_transform()
    for row in range(2):
        logged = acc.Images(f"samples/{row}/image")[-1]
        pixels = np.asarray(Image.open(io.BytesIO(logged.encoded_image_string)).convert("RGB"))
        # one image view per row in the demo: row r's is view r
        expected = (unnormalise(batch["pixel_values"][row], transform.mean, transform.std) * 255).permute(1, 2, 0)
        assert pixels.shape == (64, 64, 3)
        assert np.abs(pixels.astype(int) - expected.numpy()).max() <= 1.0
    # the final model answers the same rows again: the text holds that answer and the reference
    labels = batch["labels"][:2]
    prompt_lengths = (labels != IGNORE_INDEX).int().argmax(dim=1)
    answers = module.model.generate(
        batch["input_ids"][:2], prompt_lengths, batch["pixel_values"][:2], 3, module.tokenizer.eos_token_id
    )
    for row in range(2):
        (text,) = [e for e in acc.Tensors(f"samples/{row}/text/text_summary") if e.step == 3]
        text = text.tensor_proto.string_val[0].decode()
        reference = module.tokenizer.decode(labels[row][labels[row] != IGNORE_INDEX], skip_special_tokens=True)
        generated = module.tokenizer.decode(answers[row], skip_special_tokens=True)
        assert f"**generated:** {generated}\n" in text and text.endswith(f"**reference:** {reference}")
        assert text.count("<image>") == 1 and "ASSISTANT" in text.split("**generated:**")[0]
        assert reference and "Answer the question" in text
