"""Streaming WebDataset shards into batches for Lightning.

Shards are split across ranks and dataloader workers with rank and world size handed in
by the trainer, not read from the environment (spawned workers may not see it). Training
streams forever, reshuffling the shard list with seed + pass so ranks rotate shards, and
each Lightning epoch takes the same number of batches on every rank, so DDP/FSDP never
wait on a rank that ran out of data. Evaluation reads every sample exactly once.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import torch
from braceexpand import braceexpand
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from src.data.conversation import (
    IGNORE_INDEX,
    MC_FORMATS,
    TEMPLATES,
    ConversationEncoder,
    SampleError,
    build_template,
)
from src.data.decode import SkipCounter, decode_sample
from src.data.samples import IMAGE_POSITIONS, VIEWS, Example, ExampleBuilder


def expand_shards(spec: str | list[str]) -> list[str]:
    """Brace patterns (`train-{000000..000099}.tar`), lists, and any URL webdataset opens."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    return [url for item in specs for url in braceexpand(item)]


def read_sizes(shards: list[str]) -> dict[str, int]:
    """Samples per shard from the `sizes.json` beside each local shard (unknown ones left out)."""
    sizes: dict[str, int] = {}
    tables: dict[Path, dict] = {}
    for shard in shards:
        path = Path(shard)
        table_path = path.parent / "sizes.json"
        if table_path not in tables:
            tables[table_path] = json.loads(table_path.read_text()) if table_path.is_file() else {}
        if path.name in tables[table_path]:
            sizes[shard] = int(tables[table_path][path.name])
    return sizes


def count_samples(shards: list[str]) -> int | None:
    """Samples in these shards from their `sizes.json`; None if any shard is unknown."""
    sizes = read_sizes(shards)
    return sum(sizes.values()) if len(sizes) == len(shards) else None


def collate(examples: list[Example], pad_id: int) -> dict:
    """Right-padded batch; all images of the batch stacked in sample order."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = e.input_ids, e.labels, 1
    pixels = [e.pixel_values for e in examples if e.pixel_values is not None]
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": torch.cat(pixels) if pixels else None,
    }
    if any(e.mc is not None for e in examples):
        batch["mc_answer"] = torch.tensor([e.mc["answer"] if e.mc else -1 for e in examples])
        batch["mc_candidates"] = [e.mc["candidates"] if e.mc else [] for e in examples]
        batch["mc_type"] = [e.mc["type"] if e.mc else "" for e in examples]
        batch["mc_format"] = next(e.mc["format"] for e in examples if e.mc)
    return batch


class ShardStream(IterableDataset):
    """Batches from shards for one rank; each worker takes its own slice.

    `batches_per_epoch` set: an endless training stream, `batches_per_epoch` batches per
    iteration, continuing where the last epoch stopped (workers must persist).
    Unset: one pass over every sample, split by sample index across ranks and workers.
    """

    def __init__(
        self,
        shards: list[str],
        builder: ExampleBuilder,
        batch_size: int,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 0,
        batches_per_epoch: int | None = None,
    ) -> None:
        if not shards:
            raise ValueError("no shards given")
        self.shards = shards
        self.builder = builder
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.batches_per_epoch = batches_per_epoch
        self.skips = SkipCounter()
        self.expected = read_sizes(shards)  # to count samples a cut tar lost without an error
        self.report_shard_errors = True
        self._stream: Iterator[dict] | None = None

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("an evaluation stream has no known length")
        return self.batches_per_epoch

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def _on_shard_error(self, error: Exception) -> bool:
        if self.report_shard_errors:
            self.skips.skip("bad_shard", repr(error))
        return True  # go on with the next member or shard

    def _raw_samples(self, shards: list[str], report_missing: bool = True) -> Iterator[dict]:
        for url in shards:
            seen = 0
            for sample in tarfile_samples(iter([{"url": url}]), handler=self._on_shard_error):
                seen += 1
                yield sample
            # a tar cut at a member boundary ends like a whole one: only its size tells
            missing = self.expected.get(url, seen) - seen
            if missing > 0 and report_missing:
                for _ in range(missing):
                    self.skips.skip("missing_in_shard", f"{url} holds {seen} of {self.expected[url]} samples")

    def _examples(self, raw_samples: Iterator[dict]) -> Iterator[Example]:
        for raw in raw_samples:
            try:
                record, images = decode_sample(raw)
                yield from self.builder(record, images)
            except SampleError as error:
                self.skips.skip(error.reason, f"{raw.get('__key__')} in {raw.get('__url__')}: {error}")

    def _training_examples(self) -> Iterator[Example]:
        slot, slots = self._slot()
        if len(self.shards) < slots:
            raise ValueError(
                f"{len(self.shards)} training shards cannot feed {slots} readers (ranks x workers); "
                "write more, smaller shards or use fewer dataloader workers"
            )
        passes = 0
        while True:
            produced = 0
            order = self.shards[:]
            random.Random(self.seed + passes).shuffle(order)
            rng = random.Random(f"{self.seed}-{passes}-{slot}")
            buffer: list[Example] = []
            for example in self._examples(self._raw_samples(order[slot::slots])):
                produced += 1
                if self.shuffle_buffer <= 0:
                    yield example
                    continue
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(example)
                    continue
                index = rng.randrange(len(buffer))
                yield buffer[index]
                buffer[index] = example
            rng.shuffle(buffer)
            yield from buffer
            if produced == 0:  # endless retries of unusable shards would hang every rank
                raise RuntimeError(
                    f"no usable sample in training shards {order[slot::slots]}; skipped: {dict(self.skips.total)}"
                )
            passes += 1

    def _evaluation_examples(self) -> Iterator[Example]:
        slot, slots = self._slot()
        self.report_shard_errors = slot == 0  # every slot reads every shard: one reports
        samples = self._raw_samples(self.shards, report_missing=slot == 0)
        raw = (sample for i, sample in enumerate(samples) if i % slots == slot)
        yield from self._examples(raw)

    def _batches(self, examples: Iterator[Example]) -> Iterator[dict]:
        # a full batch leaves only when the next example exists, so the last batch of a
        # finite stream also carries the skips counted after it
        pending: list[Example] = []
        for example in examples:
            if len(pending) == self.batch_size:
                yield self._batch(pending)
                pending = []
            pending.append(example)
        if pending:
            yield self._batch(pending)
        elif self.skips.pending():
            # a reader that built nothing still hands on what it skipped
            yield {"skipped": self.skips.take(), "empty": True}

    def _batch(self, examples: list[Example]) -> dict:
        batch = collate(examples, self.pad_id)
        batch["skipped"] = self.skips.take()
        return batch

    def __iter__(self) -> Iterator[dict]:
        if self.batches_per_epoch is None:
            yield from self._batches(self._evaluation_examples())
            return
        if self._stream is None:
            self._stream = self._batches(self._training_examples())
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        share = self.batches_per_epoch // workers + (worker < self.batches_per_epoch % workers)
        for _ in range(share):
            yield next(self._stream)


class LlavaDataModule(LightningDataModule):
    """WebDataset shards -> templated, masked, padded batches.

    It knows the model only through `data_spec()` of the LightningModule: the tokenizer,
    the image transform and how many tokens one image becomes.
    """

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        test_shards: str | list[str] | None = None,
        train_view: str | list[str] = "conversations",
        eval_view: str = "mc",
        mc_format: str = "letter",
        image_position: str = "first",
        template: str = "vicuna_v1",
        system_prompt: str | None = None,
        max_length: int = 2048,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 1,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        blank_images: bool = False,
    ) -> None:
        """
        Args:
            train_shards: shard paths or URLs; brace patterns expand (`train-{000000..000011}.tar`).
            val_shards: shards read once per validation.
            test_shards: shards read once by `test`.
            train_view: how training samples are read: `conversations`, `caption` (stage 1) or `mc`;
                a list reads each sample every listed way.
            eval_view: how validation and test samples are read (`mc` scores multiple choice).
            mc_format: multiple choice asked as `letter` (reply: the letter, ranked) or `reasoned`
                (reply: the answer, then "The answer is X."; generated and parsed).
            image_position: where the `mc` view puts the image in its question: `first` (LLaVA's
                usual `<image>\nquestion`) or `last` (after the question and options).
            template: conversation template by name (`plain`, `vicuna_v1`, `llama2`, `chat_template`).
            system_prompt: replaces the template's system prompt; "" drops it.
            max_length: longest sequence in tokens (image tokens included); longer chats lose whole turns.
            batch_size: training samples per step on each rank.
            eval_batch_size: validation and test batch size (default: batch_size).
            num_workers: dataloader worker processes per rank.
            shuffle_buffer: samples held per worker for shuffling the training stream.
            samples_per_epoch: training samples per epoch over all ranks (default: from sizes.json).
            seed: seeds shard order and sample shuffling.
            blank_images: replace every image by a constant grey one, to check that answers need them.
        """
        super().__init__()
        for view in [eval_view, *([train_view] if isinstance(train_view, str) else train_view)]:
            if view not in VIEWS:
                raise ValueError(f"unknown view {view!r}; choose one of {list(VIEWS)}")
        TEMPLATES.get(template)  # an unknown template fails at start-up; building one may need the tokenizer
        if mc_format not in MC_FORMATS:
            raise ValueError(f"unknown multiple-choice format {mc_format!r}; choose one of {list(MC_FORMATS)}")
        if image_position not in IMAGE_POSITIONS:
            raise ValueError(f"unknown image_position {image_position!r}; choose one of {list(IMAGE_POSITIONS)}")
        self.save_hyperparameters()
        self.spec: dict | None = None

    def _builder(self, view: str) -> ExampleBuilder:
        hp = self.hparams
        spec = self._spec()
        encoder = ConversationEncoder(
            spec["tokenizer"],
            build_template(hp.template, hp.system_prompt, tokenizer=spec["tokenizer"]),
            image_tokens=spec["image_tokens"],
            max_length=hp.max_length,
        )
        return ExampleBuilder(
            encoder,
            spec["image_transform"],
            view,
            blank_images=hp.blank_images,
            mc_format=hp.mc_format,
            image_position=hp.image_position,
        )

    def _spec(self) -> dict:
        """Asked for when loaders are made, after the model is built (`configure_model`)."""
        if self.spec is None:
            if self.trainer is None or self.trainer.lightning_module is None:
                raise RuntimeError("LlavaDataModule needs a Trainer with a LightningModule that has data_spec()")
            self.spec = self.trainer.lightning_module.data_spec()
        return self.spec

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, dataset: ShardStream, persistent: bool) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            persistent_workers=persistent and workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        if hp.train_shards is None:
            raise ValueError("data.train_shards is not set")
        shards = expand_shards(hp.train_shards)
        rank, world = self._rank()
        samples = hp.samples_per_epoch or count_samples(shards)
        if samples is None:
            raise ValueError("set data.samples_per_epoch: the training shards have no sizes.json beside them")
        views = 1 if isinstance(hp.train_view, str) else len(hp.train_view)
        batches = max(1, samples * views // (hp.batch_size * world))  # each view is an example
        stream = ShardStream(
            shards, self._builder(hp.train_view), hp.batch_size, self._pad_id(),
            rank=rank, world_size=world, seed=hp.seed, shuffle_buffer=hp.shuffle_buffer,
            batches_per_epoch=batches,
        )  # fmt: skip
        return self._loader(stream, persistent=True)

    def _eval_loader(self, spec: str | list[str] | None, name: str) -> DataLoader:
        if spec is None:
            raise ValueError(f"data.{name} is not set")
        rank, world = self._rank()
        stream = ShardStream(
            expand_shards(spec), self._builder(self.hparams.eval_view),
            self.hparams.eval_batch_size or self.hparams.batch_size, self._pad_id(),
            rank=rank, world_size=world,
        )  # fmt: skip
        return self._loader(stream, persistent=False)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.hparams.val_shards, "val_shards")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.hparams.test_shards, "test_shards")

    def _pad_id(self) -> int:
        tokenizer = self._spec()["tokenizer"]
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
