"""The Lightning side of the data: which shards, read how, batched how, resumed where.

The streaming itself lives in `src/data/stream.py`. This module turns the `data:` section
of a config into streams for each stage, hands rank and world size to them (spawned
workers may not see the environment), and keeps the training stream's position in
checkpoints: each training batch carries its reader's position, the module remembers the
last one each reader delivered, and a resumed run starts every reader there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from src.data.conversation import MC_FORMATS, TEMPLATES, ConversationEncoder, build_template
from src.data.decode import IMAGE_FORMATS, MAX_PIXELS, ImagePolicy
from src.data.samples import IMAGE_POSITIONS, PROMPT_VIEW, VIEWS, ExampleBuilder
from src.data.spec import DataSpec, DataSpecSource
from src.data.stream import (  # noqa: F401  (re-exported: the data API in one place)
    BATCHING,
    JsonSamples,
    ShardStream,
    StreamSource,
    check_shards,
    collate,
    count_samples,
    expand_shards,
    read_sizes,
)

STATE_VERSION = 1


class LockstepBatches:
    """Evaluation batches in lockstep over ranks: every rank yields as many batches as the rank
    with the most, the missing ones being fillers (a copy of the rank's last batch marked
    `filler`, which the module runs and discards).

    Evaluation readers split samples, not batches, so ranks can end one batch apart. Under
    FSDP every forward gathers parameters on all ranks: a rank that has finished while another
    runs one more batch leaves that gather unanswered (a hang). Before each batch the ranks
    agree, with one scalar all-reduce, whether any of them still has one. A reader that built
    no example hands on only its skip counts (`empty`): it becomes a filler carrying them.
    """

    def __init__(self, loader: DataLoader, strategy) -> None:
        self.loader, self.strategy = loader, strategy

    def _any_rank_has(self, has: bool) -> bool:
        flag = torch.tensor(float(has), device=self.strategy.root_device)
        return float(self.strategy.reduce(flag, reduce_op="sum")) > 0

    def __iter__(self):
        last = None
        for batch in self.loader:
            if batch.get("empty") and last is not None:
                batch = self._filler(last) | {"skipped": batch.get("skipped") or {}}
            elif not batch.get("empty"):
                last = batch
            if not self._any_rank_has(True):  # never: this rank has one; keeps the all-reduces paired
                return
            yield batch
        while self._any_rank_has(False):
            if last is None:
                raise RuntimeError(
                    "this rank read no evaluation example while others still evaluate: use fewer processes "
                    "or a larger evaluation set (under FSDP every rank must run every batch)"
                )
            yield self._filler(last)

    @staticmethod
    def _filler(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if k != "skipped"} | {"filler": True}


@dataclass
class MixtureSource:
    """One shard set of a training mixture."""

    shards: str | list[str]
    """Paths, brace patterns or URLs of this set's shards."""
    weight: float = 1.0
    """Share of training samples drawn from this set (weights are normalised)."""
    view: str | list[str] | None = None
    """How this set's samples are read (`conversations`, `caption`, `mc`, or a registered view:
    `src.data.views`); None: data.train_view."""
    resample: bool = False
    """Draw this set's shards with replacement instead of in shuffled passes."""
    samples: int | None = None
    """Samples in this set, for the epoch length; None: from its sizes.json."""
    name: str = ""
    """A label for logs and errors."""


class LlavaDataModule(LightningDataModule):
    """WebDataset shards -> templated, masked, padded batches.

    It knows the model only through a `DataSpec` (`src.data.spec`): the tokenizer, the image
    transform and how many tokens one image becomes. Whoever builds the model hands it over, as a
    value (`datamodule.spec = ...`) or as a `DataSpecSource` asked once, when the first loader is
    made (`datamodule.spec_source = ...`; `src.cli` sets the model). Without either, the Trainer's
    LightningModule is asked, if it is a `DataSpecSource` (`trainer.fit(module, datamodule=dm)`).
    The source is asked late on purpose: the model's parts are built in `configure_model`, under
    the strategy (FSDP shards them as they appear), which runs before the loaders are made.
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
        train_mixture: list[MixtureSource] | None = None,
        resample_shards: bool = False,
        batching: str = "shuffle",
        window_batches: int = 8,
        pack_length: int | None = None,
        global_batch_size: int | None = None,
        predict_shards: str | list[str] | None = None,
        predict_json: str | None = None,
        predict_images: str | None = None,
        image_formats: list[str] | None = None,
        max_image_pixels: int = MAX_PIXELS,
    ) -> None:
        """
        Args:
            train_shards: shard paths or URLs; brace patterns expand (`train-{000000..000011}.tar`).
            val_shards: shards read once per validation.
            test_shards: shards read once by `test`.
            train_view: how training samples are read: `conversations`, `caption` (stage 1), `mc`, or a
                view registered in `src.data.views` (docs/extending.md); a list reads each sample every listed way.
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
            shuffle_buffer: raw samples (undecoded) held per worker for shuffling the training stream.
            samples_per_epoch: training samples per epoch over all ranks (default: from sizes.json).
            seed: seeds shard order and sample shuffling.
            blank_images: replace every image by a constant grey one, to check that answers need them.
            train_mixture: instead of train_shards, several shard sets with weights (and each its own
                view), e.g. a caption set and an instruction set.
            resample_shards: draw training shards with replacement (any number of shards feeds any
                number of readers) instead of shuffled passes that split them.
            batching: `shuffle` (examples shuffled within a window, then batched), `modality_length`
                (LLaVA's grouping: image and text-only examples in separate batches of similar
                lengths) or `pack` (several examples per row, attention kept within each).
            window_batches: batches formed together from one window of examples (the span of
                shuffling, grouping and packing).
            pack_length: tokens per packed row (`batching: pack`); default: max_length.
            global_batch_size: examples per optimizer step over all ranks; gradient accumulation is set
                to global / (batch_size x devices x nodes), so a recipe keeps its batch on any cluster.
            predict_shards: shards `predict` answers: each sample's `conversations` without its last
                gpt turn is the prompt (that turn, if any, is the reference); read once, split across
                processes and workers by sample index.
            predict_json: instead of predict_shards, a LLaVA-format JSON list or JSONL file.
            predict_images: the image folder of predict_json's relative paths (default: the JSON's folder).
            image_formats: image formats decoded, as Pillow names them, told by the bytes, never the
                member's name (default: JPEG, PNG, WEBP); an image in any other is skipped (`bad_image_format`).
            max_image_pixels: an image whose header claims more pixels (width x height) is skipped before
                it is decoded (`too_many_pixels`): the decompression-bomb budget, below Pillow's own.
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
        if batching not in BATCHING:
            raise ValueError(f"unknown batching {batching!r}; choose one of {list(BATCHING)}")
        if train_shards is not None and train_mixture:
            raise ValueError("set data.train_shards or data.train_mixture, not both")
        if predict_shards is not None and predict_json is not None:
            raise ValueError("set data.predict_shards or data.predict_json, not both")
        self.image_policy = ImagePolicy(IMAGE_FORMATS if image_formats is None else image_formats, max_image_pixels)
        self.mixture = [m if isinstance(m, MixtureSource) else MixtureSource(**m) for m in train_mixture or []]
        for source in self.mixture:
            views = [source.view] if isinstance(source.view, str) else source.view or []
            for view in views:
                if view not in VIEWS:
                    raise ValueError(f"train_mixture {source.name or source.shards}: unknown view {view!r}")
        self.save_hyperparameters()
        self._spec: DataSpec | None = None
        self.spec_source: DataSpecSource | None = None
        self.positions: dict[str, dict] = {}  # reader -> position after its last delivered batch
        self.epoch_used: dict[str, int] = {}  # reader -> batches it delivered in the current epoch
        self.epoch_seen = -1
        self.resume: dict = {}

    @property
    def spec(self) -> DataSpec | None:
        """The spec handed over, or None before anyone did (see `resolve_spec`)."""
        return self._spec

    @spec.setter
    def spec(self, value: DataSpec | dict | None) -> None:
        self._spec = None if value is None else DataSpec.of(value)

    def resolve_spec(self) -> DataSpec:
        """The spec: the one handed over, else `spec_source`'s, else the Trainer's module's (asked once)."""
        if self._spec is None:
            source = self.spec_source
            if source is None and self.trainer is not None:
                source = self.trainer.lightning_module
            if not isinstance(source, DataSpecSource):
                raise RuntimeError(
                    "LlavaDataModule needs a DataSpec (tokenizer, image transform, image tokens): set "
                    "datamodule.spec or datamodule.spec_source, or run it under a Trainer whose LightningModule "
                    "has data_spec()"
                )
            self.spec = source.data_spec()
        return self._spec

    def example_builder(self, view: str | list[str]) -> ExampleBuilder:
        """Records -> examples the way this datamodule's loaders make them for `view` (its template,
        system prompt, length limit, multiple-choice format and image settings)."""
        hp = self.hparams
        spec = self.resolve_spec()
        encoder = ConversationEncoder(
            spec.tokenizer,
            build_template(hp.template, hp.system_prompt, tokenizer=spec.tokenizer),
            image_tokens=spec.image_tokens,
            max_length=hp.max_length,
        )
        return ExampleBuilder(
            encoder,
            spec.image_transform,
            view,
            blank_images=hp.blank_images,
            mc_format=hp.mc_format,
            image_position=hp.image_position,
            image_token_count=spec.image_token_count,
        )

    def pad_id(self) -> int:
        """The token id batches are padded with."""
        return self.resolve_spec().pad_id

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _lockstep(self, loader: DataLoader) -> DataLoader | LockstepBatches:
        trainer = self.trainer
        return LockstepBatches(loader, trainer.strategy) if trainer is not None and trainer.world_size > 1 else loader

    def _loader(self, dataset: ShardStream, persistent: bool) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            persistent_workers=persistent and workers > 0,
        )

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.global_batch_size:
            self._set_accumulation()

    def _set_accumulation(self) -> None:
        trainer, hp = self.trainer, self.hparams
        per_step = hp.batch_size * trainer.world_size
        if hp.global_batch_size % per_step:
            raise ValueError(
                f"data.global_batch_size {hp.global_batch_size} is not a multiple of data.batch_size {hp.batch_size} "
                f"x {trainer.world_size} processes = {per_step}; change the micro batch or the number of devices"
            )
        steps = hp.global_batch_size // per_step
        if trainer.accumulate_grad_batches not in (1, steps):
            raise ValueError(
                f"trainer.accumulate_grad_batches {trainer.accumulate_grad_batches} conflicts with "
                f"data.global_batch_size (which needs {steps}); set one of them"
            )
        trainer.accumulate_grad_batches = steps
        rank_zero_info(
            f"global batch {hp.global_batch_size} = {hp.batch_size} per device x {trainer.world_size} processes "
            f"x {steps} accumulation steps"
        )

    def _sources(self) -> tuple[list[StreamSource], int]:
        """The training shard sets, and the examples in one epoch over all of them."""
        hp = self.hparams
        if self.mixture:
            specs = [(m.shards, m.weight, m.view or hp.train_view, m.resample or hp.resample_shards, m.samples,
                      m.name) for m in self.mixture]  # fmt: skip
        elif hp.train_shards is not None:
            specs = [(hp.train_shards, 1.0, hp.train_view, hp.resample_shards, hp.samples_per_epoch, "")]
        else:
            raise ValueError("data.train_shards (or data.train_mixture) is not set")
        sources, examples = [], 0
        for shards, weight, view, resample, samples, name in specs:
            urls = expand_shards(shards)
            check_shards(urls, shards, f"training shards{f' of {name}' if name else ''}")
            count = samples or count_samples(urls)
            if count is None and not hp.samples_per_epoch:
                raise ValueError(
                    f"set data.samples_per_epoch: the training shards {name or shards} have no sizes.json beside them"
                )
            sources.append(StreamSource(urls, self.example_builder(view), weight, resample, name))
            examples += (count or 0) * (1 if isinstance(view, str) else len(view))  # each view is an example
        if hp.samples_per_epoch:
            examples = hp.samples_per_epoch * (1 if isinstance(hp.train_view, str) else len(hp.train_view))
        return sources, examples

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        rank, world = self._rank()
        sources, examples = self._sources()
        batches = max(1, examples // (hp.batch_size * world))
        stream = ShardStream(
            [], None, hp.batch_size, self.pad_id(), rank=rank, world_size=world, seed=hp.seed,
            shuffle_buffer=hp.shuffle_buffer, batches_per_epoch=batches, sources=sources, batching=hp.batching,
            window_batches=hp.window_batches, pack_length=hp.pack_length or hp.max_length,
            resume=self._resume_for(rank, batches), image_policy=self.image_policy,
        )  # fmt: skip
        return self._loader(stream, persistent=True)

    # ---- the training stream's position in checkpoints --------------------------------
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        stream = batch.pop("stream", None) if isinstance(batch, dict) else None
        if stream is not None and self.trainer is not None and self.trainer.training:
            slot = str(stream["slot"])
            if stream["epoch"] != self.epoch_seen:  # a reader's first batch of a new epoch
                self.epoch_seen = stream["epoch"]
                self.epoch_used = {}
            self.positions[slot] = stream["position"]
            self.epoch_used[slot] = stream["index"] + 1
            self.readers = stream["slots"]
        return batch

    def state_dict(self) -> dict:
        """Every rank's readers (gathered: only rank 0 writes the checkpoint)."""
        mine = {"positions": self.positions, "epoch_used": self.epoch_used}
        if dist.is_available() and dist.is_initialized():
            gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        state = {"version": STATE_VERSION, "fingerprint": self._fingerprint(), "readers": getattr(self, "readers", 0)}
        state["positions"] = {k: v for part in gathered for k, v in part["positions"].items()}
        state["epoch_used"] = {k: v for part in gathered for k, v in part["epoch_used"].items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or state.get("fingerprint") != self._fingerprint():
            rank_zero_warn(
                "the checkpoint's data stream was made with other data settings (shards, seed, batching, "
                "batch size or views): the training stream starts afresh instead of where it stopped"
            )
            return
        self.resume = state

    def _resume_for(self, rank: int, batches_per_epoch: int) -> dict:
        state, self.resume = self.resume, {}
        if not state or not state.get("positions"):
            return {}
        workers = max(1, self.hparams.num_workers)
        readers = self._rank()[1] * workers
        if state["readers"] != readers:
            rank_zero_warn(
                f"the checkpoint's data stream had {state['readers']} readers (ranks x workers), this run has "
                f"{readers}: the training stream starts afresh instead of where it stopped"
            )
            return {}
        mine = {str(rank * workers + w) for w in range(workers)}
        resume = {k: v for k, v in state["positions"].items() if k in mine}
        used = {k: v for k, v in state["epoch_used"].items() if k in mine}
        # batches_per_epoch counts one rank's batches: compare this rank's readers' (ranks run in step)
        if sum(used.values()) < batches_per_epoch:  # stopped mid-epoch: finish it
            resume["epoch_used"] = used
        rank_zero_info(f"data stream resumes {len(state['positions'])} readers where the checkpoint left them")
        return resume

    def _fingerprint(self) -> str:
        """What decides the stream's content: resuming under other settings would be a lie."""
        hp = self.hparams
        keys = ("train_shards", "train_view", "seed", "batch_size", "batching", "window_batches", "pack_length",
                "shuffle_buffer", "resample_shards", "max_length", "template", "mc_format")  # fmt: skip
        return repr([hp.get(k) for k in keys] + [repr(m) for m in self.mixture])

    def _eval_loader(self, spec: str | list[str] | None, name: str) -> DataLoader:
        if spec is None:
            raise ValueError(f"data.{name} is not set")
        rank, world = self._rank()
        urls = expand_shards(spec)
        check_shards(urls, spec, f"data.{name}")  # before the model's spec is asked for
        stream = ShardStream(
            urls, self.example_builder(self.hparams.eval_view),
            self.hparams.eval_batch_size or self.hparams.batch_size, self.pad_id(),
            rank=rank, world_size=world, image_policy=self.image_policy,
        )  # fmt: skip
        return self._lockstep(self._loader(stream, persistent=False))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.hparams.val_shards, "val_shards")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.hparams.test_shards, "test_shards")

    def predict_dataloader(self) -> DataLoader:
        """The `prompt` view of predict_shards or predict_json: batches of prompts with `meta`
        (id, prompt text, reference, index) per row."""
        hp = self.hparams
        if hp.predict_shards is None and hp.predict_json is None:
            raise ValueError("data.predict_shards or data.predict_json is not set (the samples `predict` answers)")
        rank, world = self._rank()
        json_source = JsonSamples(hp.predict_json, hp.predict_images) if hp.predict_json is not None else None
        shards = [str(hp.predict_json)] if json_source is not None else expand_shards(hp.predict_shards)
        if json_source is None:
            check_shards(shards, hp.predict_shards, "data.predict_shards")
        stream = ShardStream(
            shards, self.example_builder(PROMPT_VIEW), hp.eval_batch_size or hp.batch_size, self.pad_id(),
            rank=rank, world_size=world, raw_source=json_source, image_policy=self.image_policy,
        )  # fmt: skip
        return self._lockstep(self._loader(stream, persistent=False))
