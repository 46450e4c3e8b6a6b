"""LlavaLitModule: schedule, freeze policy, config coercion, and skips reaching the logs."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from peft import PeftModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from src.cli import main
from src.data.conversation import IMAGE_TAG
from src.model.language import LLMConfig
from src.model.lora import LoraSettings, save_lora_adapter
from src.model.vision import VisionConfig
from src.training import module as module_file
from src.training.module import FreezeConfig, LlavaLitModule, OptimizerConfig, _as_config, warmup_cosine

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "lightning_config.yaml")
TOKENIZER = str(ROOT / "data_shards/demo/tokenizer")
TINY = {
    "vision": VisionConfig(
        name="vit_tiny_patch16_224", image_size=64, kwargs={"patch_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}
    ),
    "llm": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "num_key_value_heads": 2}},
}  # fmt: skip


def test_warmup_then_cosine_to_the_floor():
    assert warmup_cosine(0, 10, 110, 0.1) == 0.0  # the first step at lr 0, as transformers' schedule
    assert warmup_cosine(9, 10, 110, 0.1) == pytest.approx(0.9)
    assert warmup_cosine(10, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 110, 0.1) == pytest.approx(0.1)


def test_freeze_policy_sets_what_trains():
    module = LlavaLitModule(TOKENIZER, freeze=FreezeConfig(vision="frozen", projector="full", llm="frozen"), **TINY)
    module.configure_model()
    trains = {
        part: {p.requires_grad for p in getattr(module.model, part).parameters()}
        for part in ("vision", "projector", "llm")
    }
    assert trains == {"vision": {False}, "projector": {True}, "llm": {False}}
    spec = module.data_spec()
    assert spec["image_tokens"] == 4 and spec["image_transform"].size == 64


def test_unknown_freeze_mode_and_nothing_to_train():
    with pytest.raises(
        ValueError, match=r"freeze.vision: unknown mode 'lora'; choose one of \['frozen', 'full', 'partial'\]"
    ):
        LlavaLitModule(TOKENIZER, freeze=FreezeConfig(vision="lora"), **TINY)
    with pytest.raises(
        ValueError, match=r"freeze.llm: unknown mode 'qlora'; choose one of \['frozen', 'full', 'lora', 'partial'\]"
    ):
        LlavaLitModule(TOKENIZER, freeze=FreezeConfig(llm="qlora"), **TINY)
    module = LlavaLitModule(TOKENIZER, freeze=FreezeConfig("frozen", "frozen", "frozen"), **TINY)
    module.configure_model()
    with pytest.raises(ValueError, match="nothing trains"):
        module.configure_optimizers()


def test_configs_come_as_dataclasses_or_checkpoint_dicts():
    assert _as_config(OptimizerConfig, {"lr": 1e-3}) == OptimizerConfig(lr=1e-3)
    assert _as_config(OptimizerConfig, None) == OptimizerConfig()
    with pytest.raises(TypeError, match="expected OptimizerConfig or a dict"):
        _as_config(OptimizerConfig, 3)
    with pytest.raises(TypeError):
        _as_config(OptimizerConfig, {"lrr": 1e-3})


def test_a_corrupt_sample_is_skipped_counted_and_logged_while_training_goes_on(tmp_path: Path):
    good = ROOT / "data_shards/demo/train-000000.tar"
    with tarfile.open(good) as tar:
        members = tar.getmembers()[:8]  # four scenes
        data = {m.name: tar.extractfile(m).read() for m in members}
    bad = tmp_path / "bad-000000.tar"
    with open(bad, "wb") as stream, wds.TarWriter(stream, encoder=False) as writer:
        writer.write({"__key__": "broken", "jpg": data[sorted(data)[0]], "json": b"{not json"})
        for i, name in enumerate(sorted(n for n in data if n.endswith(".json"))):
            key = name.removesuffix(".json")
            jpg = b"not a jpeg" if i == 0 else data[key + ".jpg"]
            writer.write({"__key__": f"s{i}", "jpg": jpg, "json": data[name]})
    (tmp_path / "sizes.json").write_text(json.dumps({"bad-000000.tar": 5}))
    root = tmp_path / "run"
    main([
        "fit", "--config", CONFIG, f"--trainer.default_root_dir={root}", "--trainer.max_steps=3",
        "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=0", "--data.num_workers=0",
        f"--data.train_shards={bad}", "--data.batch_size=4", "--data.shuffle_buffer=0",
        "--data.window_batches=1",
    ])  # fmt: skip
    assert list(root.rglob("last.ckpt"))
    (events,) = root.rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    scalars = {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}
    # the shard opens with a broken JSON and a bad image: both counted before the first step
    assert scalars["data/skipped_train_bad_json"] == 1
    assert scalars["data/skipped_train_bad_image"] == 1
    assert len(acc.Scalars("train/loss")) == 3


LORA = {**TINY, "llm": LLMConfig(config=TINY["llm"]["config"], lora=LoraSettings(r=4, alpha=8))}


def test_lora_trains_the_adapter_alone_and_the_optimizer_sees_only_it(monkeypatch, tmp_path):
    module = LlavaLitModule(TOKENIZER, freeze=FreezeConfig(vision="frozen", projector="full", llm="lora"), **LORA)
    module.configure_model()
    model = module.model
    module.configure_model()
    assert module.model is model  # built once
    llm = model.llm
    assert isinstance(llm, PeftModel)
    lora = sum(p.numel() for n, p in llm.named_parameters() if "lora_" in n)
    counts = module.parameter_counts()
    assert counts["llm"] == (lora, sum(p.numel() for p in llm.parameters()))
    assert 0 < lora < counts["llm"][1]
    assert counts["vision"][0] == 0 and counts["projector"][0] == counts["projector"][1] > 0
    assert not llm.get_input_embeddings().weight.requires_grad
    assert not llm.get_output_embeddings().weight.requires_grad
    monkeypatch.setattr(module, "_trainer", type("Stub", (), {"estimated_stepping_batches": 10})())
    optimizer = module.configure_optimizers()["optimizer"]
    grouped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    assert sum(p.numel() for group in optimizer.param_groups for p in group["params"]) == lora + counts["projector"][0]
    assert module.data_spec()["image_tokens"] == 4
    out = save_lora_adapter(module, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}


def test_trust_remote_code_reaches_the_tokenizer_only_when_asked(monkeypatch):
    seen = []
    real = module_file.AutoTokenizer.from_pretrained
    monkeypatch.setattr(
        module_file.AutoTokenizer,
        "from_pretrained",
        lambda *a, **k: seen.append(k.get("trust_remote_code")) or real(*a, **k),
    )
    LlavaLitModule(TOKENIZER, **TINY)
    LlavaLitModule(TOKENIZER, llm={**TINY["llm"], "trust_remote_code": True})
    assert seen == [False, True]


def test_a_quantised_llm_cannot_train_in_full_and_needs_bitsandbytes():
    llm = LLMConfig(name="some/llm", quantization="4bit")
    with pytest.raises(ValueError, match="a quantised LLM cannot train in full: use freeze.llm lora"):
        LlavaLitModule(TOKENIZER, llm=llm, freeze=FreezeConfig(llm="full"))
    with pytest.raises(ValueError, match=r"llm.quantization 4bit needs bitsandbytes: pip install '.\[qlora\]'"):
        LlavaLitModule(TOKENIZER, llm=llm, freeze=FreezeConfig(llm="lora"))


def test_a_tokenizer_without_image_or_pad_is_prepared_and_the_model_covers_it(tmp_path):
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(70)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        tmp_path
    )  # fmt: skip
    module = LlavaLitModule(str(tmp_path), **TINY)
    assert module.image_token_id == len(words) == module.tokenizer.convert_tokens_to_ids(IMAGE_TAG)
    assert module.tokenizer.pad_token == "<unk>"
    module.configure_model()
    assert module.model.image_token_id == len(words)
    assert module.model.llm.get_input_embeddings().num_embeddings == 128  # 74 tokens, padded to 64s


def test_a_lora_run_checkpoints_and_reloads(tmp_path: Path, shards):
    root = tmp_path / "run"
    cli = main([
        "fit", "--config", CONFIG, f"--trainer.default_root_dir={root}", "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", "--data.num_workers=0",
        f"--data.train_shards={shards['train'][0]}", "--data.batch_size=4", "--data.shuffle_buffer=0",
        "--model.freeze.llm=lora", "--model.llm.lora.r=4", "--model.llm.lora.alpha=8",
    ])  # fmt: skip
    (checkpoint,) = root.rglob("last.ckpt")
    trained = cli.model.state_dict()
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trained.items())  # the adapter moved
    loaded = LlavaLitModule.load_from_checkpoint(checkpoint)
    assert isinstance(loaded.model.llm, PeftModel) and loaded.llm_config.lora.r == 4
    state = loaded.state_dict()
    assert state.keys() == trained.keys()
    for key, value in trained.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize(
    ("mode", "merge", "views", "tokens"),
    [
        # anyres: a global view + 2 crops (wide), + 4 crops (large square); unpad (LLaVA-NeXT) keeps the 2
        # middle rows of the 64x32 canvas' 8x4 token map that the 96x24 image covers, each + a newline
        ("anyres", "unpad", [3, 5], [16 + 2 * 9, 16 + 8 * 9]),
        ("anyres", "flat", [3, 5], [16 * 3, 16 * 5]),
        ("pad", "unpad", [1, 1], [16, 16]),
    ],
)
def test_images_of_any_shape_train_end_to_end_through_the_data_spec(mode, merge, views, tokens):
    """Tower -> transform -> encoder -> collate -> model: every image's tokens land at its tag."""
    from PIL import Image

    from src.data.conversation import ConversationEncoder, build_template
    from src.data.datamodule import collate
    from src.data.samples import ExampleBuilder

    clip = {"model_type": "clip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}  # fmt: skip
    grids = [[64, 32], [32, 64], [64, 64]] if mode == "anyres" else None
    vision = VisionConfig(type="hf", config=clip, image_mode=mode, anyres_grids=grids, anyres_merge=merge)
    module = LlavaLitModule(TOKENIZER, vision=vision, llm=TINY["llm"], freeze=FreezeConfig(vision="full"))
    spec = module.data_spec()
    assert spec["image_tokens"] == 16  # a 4x4 grid per view, CLS dropped
    transform = spec["image_transform"]
    images = [Image.new("RGB", (96, 24), (200, 0, 0)), Image.new("RGB", (90, 90), (0, 0, 200))]
    assert [transform.views_for(*image.size) for image in images] == views
    encoder = ConversationEncoder(spec["tokenizer"], build_template("vicuna_v1", ""), spec["image_tokens"])
    builder = ExampleBuilder(encoder, transform, "caption", image_token_count=spec["image_token_count"])
    examples = [
        builder({"caption": "a red square"}, [images[0]])[0],
        builder({"caption": "a blue circle"}, [images[1]])[0],
    ]
    batch = collate(examples, spec["tokenizer"].pad_token_id)
    assert batch["pixel_values"].shape == (sum(views), 3, 32, 32)
    placeholders = (batch["input_ids"] == module.image_token_id).sum(dim=1).tolist()
    assert placeholders == tokens
    assert batch["image_sizes"].tolist() == [[24, 96], [90, 90]]  # (height, width), as transformers'
    out = module.model(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"],
        image_sizes=batch["image_sizes"],
    )  # fmt: skip
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in module.model.vision.wrap_modules()[0].parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    newline = getattr(module.model.projector, "anyres", None)
    assert (newline is not None) == (mode == "anyres" and merge == "unpad")
    if newline is not None:  # the learned row end trains with the projector
        assert newline.image_newline.requires_grad and newline.image_newline.grad.abs().sum() > 0


def test_a_packed_batch_trains_a_step():
    """collate_packed's batch (position_ids, no attention mask, seq_lens) through Lightning's fit loop."""
    from lightning.pytorch import Callback, Trainer
    from torch.utils.data import DataLoader

    from src.data.batching import collate_packed
    from src.data.conversation import IGNORE_INDEX
    from src.data.samples import Example

    full = FreezeConfig(vision="full", projector="full", llm="full")
    # no warm-up: with one, the first step runs at lr 0 (transformers' schedule) and changes nothing
    module = LlavaLitModule(TOKENIZER, freeze=full, optimizer=OptimizerConfig(warmup_steps=0), **TINY)
    spec = module.data_spec()
    tokens = spec["image_tokens"]
    generator = torch.Generator().manual_seed(0)

    def example(length: int, images: int) -> Example:
        ids = torch.randint(10, 30, (length,), generator=generator)
        ids[1 : 1 + images * tokens] = module.image_token_id
        labels = torch.where(torch.arange(length) >= length - 3, ids, IGNORE_INDEX)
        pixels = torch.randn(images, 3, 64, 64, generator=generator) if images else None
        return Example(ids, labels, pixels)

    batch = collate_packed([[example(9, 1), example(6, 0)], [example(8, 1)]], spec["tokenizer"].pad_token_id)
    before = {name: p.detach().clone() for name, p in module.model.named_parameters()}

    class Record(Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.grads: dict[str, float] = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            for part in ("vision", "projector", "llm"):
                grads = [p.grad for p in getattr(pl_module.model, part).parameters() if p.grad is not None]
                self.grads[part] = float(sum(g.abs().sum() for g in grads))

    record = Record()
    trainer = Trainer(
        accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[record],
    )  # fmt: skip
    trainer.fit(module, DataLoader([batch], batch_size=None, collate_fn=lambda b: b))
    assert len(record.losses) == 1 and math.isfinite(record.losses[0]) and record.losses[0] > 0
    assert all(math.isfinite(g) and g > 0 for g in record.grads.values()) and len(record.grads) == 3
    changed = {name.split(".")[0] for name, p in module.model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {"vision", "projector", "llm"}


@pytest.mark.slow
def test_compiled_decoder_layers_train_to_the_same_losses(demo_dir):
    """model.fsdp.compile_blocks: every decoder layer compiled in place; losses and gradients as eager."""
    from tiny_models import tiny_lit_module

    from src.training.sharding import FSDPConfig

    torch.manual_seed(1)
    ids = torch.randint(10, 60, (3, 24))
    labels = ids.clone()
    labels[:, :8] = -100
    mask = torch.ones_like(ids)
    mask[2, 18:] = 0  # a padded row: the compiled graph must take the mask as eager does
    runs = {}
    for compiled in (False, True):
        module = tiny_lit_module(demo_dir, fsdp=FSDPConfig(compile_blocks=compiled))
        module.configure_model()
        layers = module.model.llm.get_decoder().layers
        assert all((layer._compiled_call_impl is not None) == compiled for layer in layers)
        losses = []
        optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
        for _ in range(2):
            loss = module.model(ids, mask, None, labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        runs[compiled] = (losses, module.model.state_dict())
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    assert runs[True][1].keys() == runs[False][1].keys()  # compiled in place: checkpoints keep their keys
    for key, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][key], value, rtol=1e-4, atol=1e-5)
