"""The shard stream: raw tar samples -> examples -> batches, for one rank and its workers.

Training is an endless stream per reader (a reader is one dataloader worker of one rank):
- each source (a shard set of a mixture) is read in passes; a pass shuffles the shard list
  with the seed and the pass number, then gives this reader its slice, so ranks rotate
  shards from pass to pass (or, with `resample`, draws shards with replacement);
- a buffer shuffles raw samples (bytes, not decoded tensors: cheap to hold);
- a mixer picks the source of each sample by weight;
- samples are decoded and read into examples, a window of `batch_size x window_batches`
  examples at a time, which a batching policy (shuffle, group by modality and length, or
  pack) turns into batches.

Every piece is a pure function of the seed and a small position (per source: pass and
samples handed out; the mixer's draws; how far into a window), so each batch carries the
position after it, and a resumed run replays raw samples (reading, not decoding) to that
position and goes on with exactly the batches it would have seen.

Evaluation reads every sample once, split by sample index across readers.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from braceexpand import braceexpand
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from src.data.conversation import IGNORE_INDEX, SampleError
from src.data.decode import DEFAULT_POLICY, ImagePolicy, SkipCounter, decode_sample, describe
from src.data.records import as_object, read_sizes_table
from src.data.samples import Example, ExampleBuilder

BATCHING = ("shuffle", "modality_length", "pack")


def expand_shards(spec: str | list[str]) -> list[str]:
    """Brace patterns (`train-{000000..000099}.tar`), lists, and any URL webdataset opens."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    return [url for item in specs for url in braceexpand(item)]


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def local_path(url: str) -> Path | None:
    """The file a shard URL names on this machine; None for what only its opener can check
    (`pipe:`, `https://`, `s3://` ...)."""
    scheme = _SCHEME.match(url)
    if scheme is None:
        return Path(url)
    if scheme.group(1) == "file":
        return Path(url[len("file:") :].removeprefix("//"))
    return None


def check_shards(urls: list[str], spec: str | list[str] | None = None, what: str = "shards") -> None:
    """Start-up check: every local shard exists. A missing one would otherwise be one `bad_shard`
    skip per pass: an evaluation with no metrics, or training that stops hours later with "no
    usable sample"."""
    missing = [url for url in urls if (path := local_path(url)) is not None and not path.is_file()]
    if not missing:
        return
    first = local_path(missing[0])
    problem = "is a folder, not a shard" if first is not None and first.is_dir() else "does not exist"
    named = f" named by {spec!r}" if spec is not None else ""
    hint = " (brace patterns expand, * globs do not)" if any("*" in url for url in missing) else ""
    raise FileNotFoundError(
        f"{what}: {missing[0]} {problem}; {len(missing)} of the {len(urls)} shards{named} are missing{hint}"
    )


def read_sizes(shards: list[str]) -> dict[str, int]:
    """Samples per shard from the `sizes.json` beside each local shard (unknown ones left out).
    A `sizes.json` that is not a table of whole numbers raises ValueError naming it."""
    sizes: dict[str, int] = {}
    tables: dict[Path, dict] = {}
    for shard in shards:
        path = local_path(shard)
        if path is None:
            continue
        table_path = path.parent / "sizes.json"
        if table_path not in tables:
            tables[table_path] = read_sizes_table(table_path) if table_path.is_file() else {}
        if path.name in tables[table_path]:
            sizes[shard] = tables[table_path][path.name]
    return sizes


def count_samples(shards: list[str]) -> int | None:
    """Samples in these shards from their `sizes.json`; None if any shard is unknown."""
    sizes = read_sizes(shards)
    return sum(sizes.values()) if len(sizes) == len(shards) else None


def _cat_shared(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat; in a DataLoader worker straight into shared memory, as torch's default_collate
    does, so handing the batch to the main process copies nothing more."""
    if get_worker_info() is None:
        return torch.cat(tensors)
    first = tensors[0]
    rows = sum(t.shape[0] for t in tensors)
    storage = first._typed_storage()._new_shared(sum(t.numel() for t in tensors), device=first.device)
    return torch.cat(tensors, out=first.new(storage).view(rows, *first.shape[1:]))


def collate(examples: list[Example], pad_id: int) -> dict:
    """Right-padded batch; all images of the batch stacked in sample order, their sizes alike."""
    from src.data.batching import stacked_image_sizes

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
        "pixel_values": _cat_shared(pixels) if pixels else None,
        "image_sizes": stacked_image_sizes(examples),
    }
    if any(e.mc is not None for e in examples):
        batch["mc_answer"] = torch.tensor([e.mc["answer"] if e.mc else -1 for e in examples])
        batch["mc_candidates"] = [e.mc["candidates"] if e.mc else [] for e in examples]
        batch["mc_type"] = [e.mc["type"] if e.mc else "" for e in examples]
        batch["mc_format"] = next(e.mc["format"] for e in examples if e.mc)
    if any(e.meta is not None for e in examples):
        batch["meta"] = [e.meta or {} for e in examples]
    return batch


class JsonSamples:
    """A LLaVA-format JSON list or JSONL file plus its image folder, read as the raw samples a
    shard of it would hold (prediction straight from JSON, no shards to write).

    Called with (reader slot, readers) it yields this reader's records only (record index modulo
    readers, as evaluation splits shards), each with its `__index__` in the file; only those
    records' images are read. A record that cannot be read (bad JSON line, missing image) comes
    out with its `__error__`, so the stream counts and logs it like a bad shard sample.
    """

    def __init__(self, path: str | Path, image_root: str | Path | None = None) -> None:
        from src.data.inputs import read_records

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} is not a file (a LLaVA-format JSON or JSONL)")
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"the image folder {self.image_root} of {self.path} is not a folder")
        read_records(self.path)  # a JSON list that does not parse stops start-up, not a worker

    def __call__(self, slot: int, slots: int) -> Iterator[dict]:
        from src.data.inputs import load_image, read_records
        from src.data.records import image_paths

        records, _ = read_records(self.path)
        for index, record in enumerate(records):
            if index % slots != slot:
                continue
            key = str(index)
            if isinstance(record, dict) and isinstance(record.get("id"), (str, int)):
                key = str(record["id"])
            raw: dict = {"__key__": key, "__url__": str(self.path), "__index__": index}
            try:
                record = as_object(record)  # not_an_object / too_deep, or the line's bad_json
                raw["json"] = json.dumps(record, ensure_ascii=False).encode("utf-8")
                paths = image_paths(record)
                for k, relative in enumerate(paths):
                    data, ext, _ = load_image(self.image_root / relative)
                    raw[ext if len(paths) == 1 else f"{k}.{ext}"] = data
            except SampleError as error:
                raw["__error__"] = error
            yield raw


@dataclass
class StreamSource:
    """One shard set of the training stream, read with its own builder (view)."""

    shards: list[str]
    builder: ExampleBuilder
    weight: float = 1.0
    resample: bool = False
    name: str = ""


# a reader's position: per source (pass, samples handed out in that pass), mixer draws,
# examples of the first sample already used, batches of the window already given
Position = dict


class RawReader:
    """Endless raw samples of one source for one reader: passes over its shards, shuffled."""

    def __init__(
        self,
        index: int,
        source: StreamSource,
        slot: int,
        slots: int,
        seed: int,
        buffer_size: int,
        open_samples: Callable[[list[str]], Iterator[dict]],
    ) -> None:
        if not source.resample and len(source.shards) < slots:
            raise ValueError(
                f"{len(source.shards)} training shards{f' in {source.name}' if source.name else ''} cannot feed "
                f"{slots} readers (ranks x workers); write more, smaller shards, use fewer dataloader workers, "
                "or resample shards"
            )
        self.index, self.source, self.slot, self.slots = index, source, slot, slots
        self.seed, self.buffer_size, self.open_samples = seed, buffer_size, open_samples
        self.pass_, self.emitted, self.usable = 0, 0, 0
        self._samples: Iterator[dict] | None = None

    def _shards_of_pass(self, pass_: int) -> list[str]:
        shards = self.source.shards
        if self.source.resample:
            rng = random.Random(f"{self.seed}-{self.index}-{pass_}-{self.slot}-resample")
            return [rng.choice(shards) for _ in range(max(1, len(shards) // self.slots))]
        order = shards[:]
        random.Random(f"{self.seed}-{self.index}-{pass_}").shuffle(order)
        return order[self.slot :: self.slots]

    def _pass(self, pass_: int) -> Iterator[dict]:
        rng = random.Random(f"{self.seed}-{self.index}-{pass_}-{self.slot}")
        buffer: list[dict] = []
        for sample in self.open_samples(self._shards_of_pass(pass_)):
            sample["__source__"] = self.index
            if self.buffer_size <= 0:
                yield sample
                continue
            if len(buffer) < self.buffer_size:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def next(self) -> dict:
        while True:
            if self._samples is None:
                self._samples = self._pass(self.pass_)
            sample = next(self._samples, None)
            if sample is not None:
                self.emitted += 1
                return sample
            if self.usable == 0:  # endless retries of unusable shards would hang every rank
                raise RuntimeError(
                    f"no usable sample in a whole pass over training shards {self._shards_of_pass(self.pass_)}"
                )
            self.pass_, self.emitted, self.usable, self._samples = self.pass_ + 1, 0, 0, None

    @property
    def position(self) -> tuple[int, int]:
        return (self.pass_, self.emitted)

    def seek(self, position: tuple[int, int]) -> None:
        """Replays this pass up to `position` without decoding anything."""
        self.pass_, self.emitted, self._samples = int(position[0]), 0, None
        for _ in range(int(position[1])):
            self.next()
        self.usable = self.emitted  # what was read before was used, or the run would have stopped


class Mixer:
    """Picks the source of each sample by weight; its position is the number of draws."""

    def __init__(self, weights: list[float], slot: int, seed: int) -> None:
        if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"mixture weights must be non-negative with a positive sum, got {weights}")
        total = sum(weights)
        self.cumulative = [sum(weights[: i + 1]) / total for i in range(len(weights))]
        self.slot, self.seed = slot, seed
        self.draws = 0
        self._rng = random.Random(f"{seed}-mix-{slot}")

    def draw(self) -> int:
        self.draws += 1
        if len(self.cumulative) == 1:
            return 0
        u = self._rng.random()
        return next(i for i, c in enumerate(self.cumulative) if u < c or i == len(self.cumulative) - 1)

    def seek(self, draws: int) -> None:
        self.draws, self._rng = 0, random.Random(f"{self.seed}-mix-{self.slot}")
        for _ in range(int(draws)):
            self.draw()


class ShardStream(IterableDataset):
    """Batches from shards for one rank; each dataloader worker is its own reader.

    `batches_per_epoch` set: the endless training stream, `batches_per_epoch` batches per
    Lightning epoch over the rank's workers, continuing where the last epoch stopped
    (workers must persist); each batch carries its reader's position (`stream`).
    Unset: one pass over every sample, split by sample index across ranks and workers.
    """

    def __init__(
        self,
        shards: list[str],
        builder: ExampleBuilder | None,
        batch_size: int,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 0,
        batches_per_epoch: int | None = None,
        sources: list[StreamSource] | None = None,
        batching: str = "shuffle",
        window_batches: int = 8,
        pack_length: int | None = None,
        resume: dict | None = None,
        collate_fn: Callable | None = None,
        raw_source: Callable[[int, int], Iterator[dict]] | None = None,
        image_policy: ImagePolicy = DEFAULT_POLICY,
    ) -> None:
        if sources is None:
            if not shards:
                raise ValueError("no shards given")
            sources = [StreamSource(list(shards), builder)]
        if not sources or any(not s.shards for s in sources):
            raise ValueError("no shards given")
        if batching not in BATCHING:
            raise ValueError(f"unknown batching {batching!r}; choose one of {list(BATCHING)}")
        if batching == "pack" and not pack_length:
            raise ValueError("batching pack needs pack_length (tokens per packed row)")
        if window_batches < 1:
            raise ValueError(f"window_batches must be at least 1, got {window_batches}")
        self.sources = sources
        self.shards = [shard for s in sources for shard in s.shards]
        self.builder = sources[0].builder
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer = shuffle_buffer
        self.batches_per_epoch = batches_per_epoch
        self.batching, self.window_batches, self.pack_length = batching, window_batches, pack_length
        self.resume = resume or {}
        self.collate = collate_fn or collate
        self.raw_source = raw_source  # evaluation: (slot, slots) -> this reader's raw samples, instead of the tars
        self.image_policy = image_policy
        self.skips = SkipCounter()
        check_shards(self.shards)
        self.expected = read_sizes(self.shards)  # to count samples a cut tar lost without an error
        self.report_shard_errors = True
        self._stream: Iterator[dict] | None = None
        self._epochs = 0

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("an evaluation stream has no known length")
        return self.batches_per_epoch

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    # ---- reading ----------------------------------------------------------------------
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

    def _read(self, raw: dict, builder: ExampleBuilder, draft: bool = False) -> list[Example]:
        """`draft`: decode large JPEGs at a reduced scale that still covers the transform's size
        (training only: evaluation decodes at full size, as reference pipelines do)."""
        try:
            if "__error__" in raw:  # a record its source could not read (JsonSamples)
                raise raw["__error__"]
            record, images = decode_sample(raw, builder.draft_size if draft else None, self.image_policy)
            examples = builder(record, images)
            for example in examples:  # prediction: which sample this is, to name and order the outputs
                if example.meta is not None:
                    example.meta.update(key=raw.get("__key__"), index=raw.get("__index__"))
                    if example.meta.get("id") is None:
                        example.meta["id"] = str(raw.get("__key__"))
            return examples
        except SampleError as error:
            self.skips.skip(error.reason, f"{describe(raw)}: {error}")
            return []

    def _examples(self, raw_samples: Iterator[dict]) -> Iterator[Example]:
        for raw in raw_samples:
            yield from self._read(raw, self.builder)

    # ---- training ---------------------------------------------------------------------
    def _training_batches(self, slot: int, slots: int) -> Iterator[tuple[dict, Position]]:
        """Endless (batch, position after it) pairs for one reader.

        A window holds exactly `batch_size x window_batches` examples. When a sample's
        examples straddle two windows, the rest opens the next window; its position says
        "re-read the sample at this position and drop the examples already used".
        """
        readers = [
            RawReader(i, s, slot, slots, self.seed, self.shuffle_buffer, self._raw_samples)
            for i, s in enumerate(self.sources)
        ]
        mixer = Mixer([s.weight for s in self.sources], slot, self.seed)

        def here() -> dict:
            return {"sources": [list(r.position) for r in readers], "draws": mixer.draws}

        def read_next() -> list[Example]:
            reader = readers[mixer.draw()]
            got = self._read(reader.next(), reader.source.builder, draft=True)
            reader.usable += bool(got)
            return got

        size = self.batch_size * self.window_batches
        carry: tuple[dict, int, list[Example]] | None = None  # (position of the cut sample, used, rest)
        done = 0
        start = self.resume.get(str(slot))
        if start is not None:
            for reader, position in zip(readers, start["sources"], strict=True):
                reader.seek(position)
            mixer.seek(start["draws"])
            done = int(start["done"])
            if int(start["skip"]):
                origin = here()
                carry = (origin, int(start["skip"]), read_next()[int(start["skip"]) :])
        while True:
            if carry is not None:
                window_start, start_skip, examples = carry
                carry = None
            else:
                window_start, start_skip, examples = here(), 0, []
            if len(examples) > size:  # one sample with more examples than a window
                carry = (window_start, start_skip + size, examples[size:])
                examples = examples[:size]
            while len(examples) < size:
                before = here()
                got = read_next()
                need = size - len(examples)
                if len(got) > need:
                    carry = (before, need, got[need:])
                    got = got[:need]
                examples += got
            rng = random.Random(f"{self.seed}-window-{slot}-{json.dumps(window_start)}-{start_skip}")
            batches = self._policy(examples, rng)
            for i in range(done, len(batches)):
                if i + 1 < len(batches):
                    after = window_start | {"skip": start_skip, "done": i + 1}
                elif carry is not None:
                    after = carry[0] | {"skip": carry[1], "done": 0}
                else:
                    after = here() | {"skip": 0, "done": 0}
                yield batches[i](), after
            done = 0

    def _policy(self, examples: list[Example], rng: random.Random) -> list[Callable[[], dict]]:
        """The window's batches, each collated only when it is handed out."""
        from src.data import batching

        if self.batching == "pack":
            packed = batching.pack(examples, self.pack_length, self.batch_size, rng)
            return [partial(batching.collate_packed, rows, self.pad_id) for rows in packed]
        if self.batching == "modality_length":
            groups = batching.group_by_modality_length(examples, self.batch_size, rng)
        else:
            order = examples[:]
            rng.shuffle(order)
            groups = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [partial(self.collate, group, self.pad_id) for group in groups]

    # ---- evaluation -------------------------------------------------------------------
    def _evaluation_examples(self) -> Iterator[Example]:
        slot, slots = self._slot()
        if self.raw_source is not None:
            yield from self._examples(self.raw_source(slot, slots))
            return
        self.report_shard_errors = slot == 0  # every slot reads every shard: one reports
        samples = self._raw_samples(self.shards, report_missing=slot == 0)
        raw = (sample | {"__index__": i} for i, sample in enumerate(samples) if i % slots == slot)
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
        batch = self.collate(examples, self.pad_id)
        batch["skipped"] = self.skips.take()
        return batch

    # ---- iteration --------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        if self.batches_per_epoch is None:
            yield from self._batches(self._evaluation_examples())
            return
        slot, slots = self._slot()
        if self._stream is None:
            self._stream = self._training_batches(slot, slots)
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        share = self.batches_per_epoch // workers + (worker < self.batches_per_epoch % workers)
        first = self._epochs
        if first == 0 and "epoch_used" in self.resume:  # resumed mid-epoch: the rest of it
            share -= int(self.resume["epoch_used"].get(str(slot), 0))
        self._epochs += 1
        for i in range(max(0, share)):
            batch, position = next(self._stream)
            batch["skipped"] = self.skips.take()
            batch["stream"] = {"slot": slot, "slots": slots, "position": position, "epoch": first, "index": i}
            yield batch
