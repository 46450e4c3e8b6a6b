"""Data-loader throughput: our shard pipeline against the official LLaVA loader, same run.

Both sides turn the same LLaVA-like workload into training batches for a CLIP-336 model:
JPEG images padded to a square with the mean colour and resized to 336 px (LLaVA-1.5's
`image_aspect_ratio: pad`), multi-turn conversations in the vicuna_v1 format tokenized and
masked, padded batches; same tokenizer, same worker count, same batch size.

- ours: `write_shards` tar shards -> `ShardStream` (safe decode, `ImageTransform(mode="pad")`,
  `ConversationEncoder`, collate) through `DataLoader(batch_size=None, num_workers=W)`, as
  `LlavaDataModule` builds its loaders.
- baseline: what haotian-liu/LLaVA's `llava/train/train.py` does: a JSON list and an image
  folder, a map-style Dataset that opens each image file with PIL, `expand2square` with the
  processor's mean colour, the CLIP image processor (shortest edge 336, centre crop 336;
  transformers' PIL backend, which is the implementation LLaVA's pinned transformers ran),
  `preprocess_multimodal` + `preprocess_v1` (the whole conversation tokenized, then every
  round and every instruction again to find the mask), and its padding collator, through
  `DataLoader(batch_size=B, num_workers=W, collate_fn=...)`. One favour to the baseline:
  it gets the same fast (Rust) tokenizer; LLaVA loads its tokenizer with `use_fast=False`.

Measurement: both loaders stay alive and timed chunks alternate between them (ours first in
odd rounds, baseline first in even ones), after a rest that lets the other side's workers
finish their queued work; a chunk is timed between two batches the main process had to
wait for (see `time_chunk`). Reported: samples/s per side, the ratio ours / baseline
overall and per round, samples/s per worker, CPU ms per sample with the workers (all
processes) and in one process (steadier than wall time on a shared machine), and a stage
breakdown that says where the time goes.

The workload (generated once into --workdir and reused while its parameters match) is
described by `IMAGE_MIX` and `conversation()` below and in benchmarks/README.md.

    python benchmarks/data_loader.py --workdir /tmp/llava-loader-bench --out results.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORKLOAD_VERSION = 2
IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id for an image in input_ids
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LLAVA_SYSTEM = (  # LLaVA's conv_vicuna_v1
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# ---- workload -----------------------------------------------------------------------------
# Sources of llava_v1_5_mix665k by image folder, their share of samples and typical sizes
# (w, h, weight). 665k = COCO 364k (LLaVA-Instruct, VQAv2, OKVQA, A-OKVQA, RefCOCO), VG+GQA
# 158k, OCR-VQA 80k, TextCaps (TextVQA images) 22k, ShareGPT text-only 40k; text-only is
# raised to 10% here and the rest scaled to fit.
IMAGE_MIX = {
    "coco": (0.53, [(640, 480, 0.62), (480, 640, 0.18), (640, 427, 0.14), (612, 612, 0.06)]),
    "vg": (0.23, [(800, 600, 0.35), (500, 375, 0.30), (800, 533, 0.20), (600, 800, 0.15)]),
    "ocr_vqa": (0.11, [(350, 500, 1.0)]),  # book covers; jittered +-15% below
    "textvqa": (0.03, [(1024, 768, 0.75), (768, 1024, 0.25)]),
    "text": (0.10, []),
}
ROUNDS_SHORT = [0.20, 0.18, 0.17, 0.15, 0.15, 0.15]  # VQA-style: many short rounds
ROUNDS_LONG = [0.50, 0.20, 0.12, 0.08, 0.05, 0.05]  # instruct / detail / ShareGPT


def _lexicon(rng: np.random.Generator, size: int = 6000) -> list[str]:
    onsets = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w", "br", "st", "tr", "ch"]
    nuclei = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io"]
    codas = ["", "", "n", "r", "s", "t", "l", "nd", "ng", "st"]
    words: set[str] = set()
    while len(words) < size:
        syllables = 1 + min(int(rng.exponential(1.0)), 4)
        words.add("".join(rng.choice(onsets) + rng.choice(nuclei) + rng.choice(codas) for _ in range(syllables)))
    return sorted(words, key=lambda w: (len(w), w))


class TextMaker:
    """Zipf-distributed pseudo-words in sentences: BPE sees word statistics like English."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.words = _lexicon(rng)
        weights = 1.0 / np.arange(1, len(self.words) + 1) ** 1.07
        self.p = weights / weights.sum()

    def words_(self, rng: np.random.Generator, n: int) -> list[str]:
        return [self.words[i] for i in rng.choice(len(self.words), size=n, p=self.p)]

    def text(self, rng: np.random.Generator, n: int, question: bool = False) -> str:
        out, words = [], self.words_(rng, n)
        while words:
            k = min(len(words), 4 + int(rng.exponential(10)))
            chunk, words = words[:k], words[k:]
            chunk[0] = chunk[0].capitalize()
            if k > 6 and rng.random() < 0.4:
                chunk[k // 2] += ","
            if rng.random() < 0.1:
                chunk.insert(1 + int(rng.integers(len(chunk))), str(int(rng.integers(1, 2000))))
            end = "?" if question and not words else "."
            out.append(" ".join(chunk) + end)
        return " ".join(out)


def _lognormal_words(rng: np.random.Generator, median: float, sigma: float, low: int, high: int) -> int:
    return int(np.clip(round(median * math.exp(sigma * rng.standard_normal())), low, high))


def conversation(rng: np.random.Generator, text: TextMaker, has_image: bool) -> list[dict]:
    """1-6 rounds; VQA-style short answers, or long-tailed instruct/detail/ShareGPT replies."""
    short = has_image and rng.random() < 0.55
    rounds = 1 + int(rng.choice(6, p=ROUNDS_SHORT if short else ROUNDS_LONG))
    messages = []
    for i in range(rounds):
        if has_image:
            q = text.text(rng, _lognormal_words(rng, 9, 0.5, 3, 60), question=True)
        else:
            q = text.text(rng, _lognormal_words(rng, 20, 0.9, 3, 300), question=True)
        if short:
            q += "\nAnswer the question using a single word or phrase."
            a = text.text(rng, int(rng.integers(1, 4)))
        elif has_image:
            a = text.text(rng, _lognormal_words(rng, 45, 0.8, 5, 350))
        else:
            a = text.text(rng, _lognormal_words(rng, 120, 0.8, 5, 500))
        if i == 0 and has_image:
            q = f"<image>\n{q}" if rng.random() < 0.8 else f"{q}\n<image>"
        messages += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return messages


def make_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Photo-like content: a smooth colour field, blurred shapes, band-limited noise texture."""
    field = rng.integers(0, 256, (int(rng.integers(2, 5)), int(rng.integers(2, 5)), 3), dtype=np.uint8)
    image = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 14))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            points = [
                (int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(int(rng.integers(3, 7)))
            ]
            draw.polygon(points, fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.6, 1.6))))
    pixels = np.asarray(image, dtype=np.float32)
    fine = rng.normal(0.0, float(rng.uniform(3.0, 7.0)), (height, width, 1))
    coarse = rng.integers(0, 256, (max(1, height // 4), max(1, width // 4)), dtype=np.uint8)
    mid = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    pixels = pixels + fine + (mid[..., None] - 128.0) * float(rng.uniform(0.1, 0.3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _plan(n: int, seed: int) -> list[tuple[str, int, int]]:
    """(source, width, height) per sample; width 0 for text-only."""
    rng = np.random.default_rng(seed)
    sources = list(IMAGE_MIX)
    shares = np.array([IMAGE_MIX[s][0] for s in sources])
    plan = []
    for source in rng.choice(len(sources), size=n, p=shares / shares.sum()):
        name = sources[source]
        sizes = IMAGE_MIX[name][1]
        if not sizes:
            plan.append((name, 0, 0))
            continue
        weights = np.array([w for _, _, w in sizes])
        width, height, _ = sizes[rng.choice(len(sizes), p=weights / weights.sum())]
        if name == "ocr_vqa":
            width, height = int(width * rng.uniform(0.85, 1.15)), int(height * rng.uniform(0.85, 1.15))
        plan.append((name, width, height))
    return plan


def _write_image(job: tuple[Path, int, int, int, int]) -> int:
    path, width, height, seed, index = job
    image = make_image(np.random.default_rng([seed, index]), width, height)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=90)
    return path.stat().st_size


def build_tokenizer(texts: list[str], out: Path, vocab_size: int = 8000) -> None:
    """A Llama-like BPE (metaspace, bos added, `</s>` special) trained on the workload's text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=["<image>"],
        model_max_length=2048,
        padding_side="right",
    )
    fast.save_pretrained(out)


def generate_workload(workdir: Path, n: int, seed: int, per_shard: int, jobs: int) -> dict:
    """Images, the LLaVA JSON list, the tokenizer and our shards under `workdir`; reused when
    its manifest matches these parameters."""
    from src.data.shards import write_shards

    params = {"version": WORKLOAD_VERSION, "images": n, "seed": seed, "per_shard": per_shard}
    manifest_path = workdir / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("params") == params:
            print(f"workload: reusing {workdir}", flush=True)
            return manifest
    for sub in ("images", "shards", "tokenizer"):
        shutil.rmtree(workdir / sub, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    plan = _plan(n, seed)
    text = TextMaker(seed)
    rng = np.random.default_rng([seed, 1])
    records, jobs_list = [], []
    for index, (source, width, height) in enumerate(plan):
        record = {"id": f"{source}-{index:06d}", "conversations": conversation(rng, text, source != "text")}
        if source != "text":
            relative = f"{source}/{index:06d}.jpg"
            record["image"] = relative
            jobs_list.append((workdir / "images" / relative, width, height, seed, index))
        records.append(record)
    with get_context("fork").Pool(jobs) as pool:
        sizes = pool.map(_write_image, jobs_list, chunksize=16)
    (workdir / "llava.json").write_text(json.dumps(records))
    texts = [vicuna_v1_prompt(r["conversations"]).replace("<image>", "") for r in records]
    build_tokenizer(texts, workdir / "tokenizer")
    summary = write_shards(records, workdir / "images", workdir / "shards", prefix="train", max_count=per_shard)
    kb = np.array(sizes) / 1024
    manifest = {
        "params": params,
        "samples": n,
        "sources": dict(Counter(source for source, _, _ in plan)),
        "image_sizes": dict(Counter(f"{w}x{h}" for source, w, h in plan if source not in ("text", "ocr_vqa"))),
        "jpeg_kb": _quantiles(list(kb)) | {"mean": float(kb.mean())},
        "rounds": dict(sorted(Counter(len(r["conversations"]) // 2 for r in records).items())),
        "words_per_sample": _quantiles([sum(len(m["value"].split()) for m in r["conversations"]) for r in records]),
        "shards": summary["shards"],
        "generated_s": round(time.perf_counter() - started, 1),
    }
    manifest_path.write_text(json.dumps(manifest, indent=1))
    print(f"workload: generated {n} samples in {manifest['generated_s']} s under {workdir}", flush=True)
    return manifest


def _quantiles(values: list[float]) -> dict:
    array = np.asarray(values, dtype=np.float64)
    return {q: float(np.percentile(array, p)) for q, p in (("p10", 10), ("p50", 50), ("p90", 90), ("p99", 99))} | {
        "max": float(array.max())
    }


# ---- baseline: LLaVA's train.py data path --------------------------------------------------
def expand2square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """LLaVA's mm_utils.tokenizer_image_token: each chunk between `<image>` tokenized on its own
    (with bos), the chunks joined by IMAGE_TOKEN_INDEX, one bos kept."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)  # LLaVA's separator [index] * (offset + 1), sliced [offset:]
        ids.extend(chunk[offset:])
    return ids


def vicuna_v1_prompt(messages: list[dict]) -> str:
    """LLaVA's Conversation.get_prompt for SeparatorStyle.TWO (sep " ", sep2 "</s>")."""
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    if messages and messages[0]["from"] != "human":
        messages = messages[1:]
    prompt = LLAVA_SYSTEM + " "
    for j, message in enumerate(messages):
        prompt += f"{roles[message['from']]}: {message['value']}" + (" " if j % 2 == 0 else "</s>")
    return prompt


def preprocess_multimodal(messages: list[dict]) -> list[dict]:
    for message in messages:
        if "<image>" in message["value"]:
            message["value"] = ("<image>\n" + message["value"].replace("<image>", "").strip()).strip()
    return messages


def preprocess_v1(messages: list[dict], tokenizer, has_image: bool, counter: Counter) -> dict:
    """LLaVA's preprocess_v1 for one conversation: tokenize it whole, then re-tokenize every
    round and every instruction to find which tokens to mask."""
    conversation = vicuna_v1_prompt(messages)
    if has_image:
        input_ids = torch.tensor(tokenizer_image_token(conversation, tokenizer), dtype=torch.long)
    else:
        input_ids = tokenizer(
            [conversation],
            return_tensors="pt",
            padding="longest",
            max_length=tokenizer.model_max_length,
            truncation=True,
        ).input_ids[0]
    target = input_ids.clone()
    sep = " ASSISTANT: "
    total_len = int(target.ne(tokenizer.pad_token_id).sum())
    cur_len = 1
    target[:cur_len] = IGNORE_INDEX
    for rou in conversation.split("</s>"):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        if has_image:
            round_len = len(tokenizer_image_token(rou, tokenizer))
            instruction_len = len(tokenizer_image_token(parts[0], tokenizer)) - 2
        else:
            round_len = len(tokenizer(rou).input_ids)
            instruction_len = len(tokenizer(parts[0]).input_ids) - 2
        target[cur_len : cur_len + instruction_len] = IGNORE_INDEX
        cur_len += round_len
    target[cur_len:] = IGNORE_INDEX
    if cur_len < tokenizer.model_max_length and cur_len != total_len:
        target[:] = IGNORE_INDEX  # LLaVA prints a warning here; counted instead
        counter["tokenization_mismatch"] += 1
    return {"input_ids": input_ids, "labels": target}


def clip_processor(kind: str, size: int):
    from transformers.models.clip import image_processing_clip, image_processing_pil_clip

    cls = image_processing_pil_clip.CLIPImageProcessorPil if kind == "pil" else image_processing_clip.CLIPImageProcessor
    return cls(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


class LazySupervisedDataset(torch.utils.data.Dataset):
    """LLaVA's LazySupervisedDataset with image_aspect_ratio 'pad' and is_multimodal."""

    def __init__(self, json_path: Path, image_folder: Path, tokenizer, processor) -> None:
        with open(json_path) as stream:
            self.list_data_dict = json.load(stream)
        self.image_folder = str(image_folder)
        self.tokenizer = tokenizer
        self.processor = processor
        self.counter: Counter = Counter()

    def __len__(self) -> int:
        return len(self.list_data_dict)

    def __getitem__(self, i: int) -> dict:
        source = self.list_data_dict[i]
        has_image = "image" in source
        if has_image:
            image = Image.open(os.path.join(self.image_folder, source["image"])).convert("RGB")
            image = expand2square(image, tuple(int(x * 255) for x in self.processor.image_mean))
            image = self.processor.preprocess(image, return_tensors="pt")["pixel_values"][0]
            messages = preprocess_multimodal(copy.deepcopy(source["conversations"]))
        else:
            messages = copy.deepcopy(source["conversations"])
        data = preprocess_v1(messages, self.tokenizer, has_image, self.counter)
        crop = self.processor.crop_size
        data["image"] = image if has_image else torch.zeros(3, crop["height"], crop["width"])
        return data


class DataCollatorForSupervisedDataset:
    def __init__(self, tokenizer) -> None:
        self.pad_id = tokenizer.pad_token_id
        self.max_length = tokenizer.model_max_length

    def __call__(self, instances: list[dict]) -> dict:
        input_ids = torch.nn.utils.rnn.pad_sequence(
            [x["input_ids"] for x in instances], batch_first=True, padding_value=self.pad_id
        )
        labels = torch.nn.utils.rnn.pad_sequence(
            [x["labels"] for x in instances], batch_first=True, padding_value=IGNORE_INDEX
        )
        input_ids, labels = input_ids[:, : self.max_length], labels[:, : self.max_length]
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": input_ids.ne(self.pad_id)}
        images = [x["image"] for x in instances]
        batch["images"] = torch.stack(images) if all(x.shape == images[0].shape for x in images) else images
        return batch


# ---- the two loaders -----------------------------------------------------------------------
class Setup:
    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        from transformers import AutoTokenizer

        self.workdir = workdir
        self.args = args
        self.tokenizer = AutoTokenizer.from_pretrained(workdir / "tokenizer")
        self.shards = [str(p) for p in sorted((workdir / "shards").glob("train-*.tar"))]

    def builder(self):
        from src.data.conversation import ConversationEncoder, build_template
        from src.data.samples import ExampleBuilder
        from src.model.vision import ImageTransform

        encoder = ConversationEncoder(
            self.tokenizer,
            build_template("vicuna_v1", None, tokenizer=self.tokenizer),
            image_tokens=self.args.image_tokens,
            max_length=self.args.max_length,
        )
        transform = ImageTransform(self.args.image_size, CLIP_MEAN, CLIP_STD, mode="pad")
        return ExampleBuilder(encoder, transform, "conversations")

    def ours(self, workers: int | None = None) -> torch.utils.data.DataLoader:
        from src.data.datamodule import ShardStream

        pad_id = self.tokenizer.pad_token_id
        stream = ShardStream(
            self.shards,
            self.builder(),
            self.args.batch_size,
            pad_id,
            rank=0,
            world_size=1,
            seed=self.args.seed,
            shuffle_buffer=self.args.shuffle_buffer,
            batches_per_epoch=10**9,
        )
        workers = self.args.workers if workers is None else workers
        return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0)

    def baseline_dataset(self) -> LazySupervisedDataset:
        processor = clip_processor(self.args.baseline_processor, self.args.image_size)
        return LazySupervisedDataset(self.workdir / "llava.json", self.workdir / "images", self.tokenizer, processor)

    def baseline(self, samples: int, workers: int | None = None) -> torch.utils.data.DataLoader:
        dataset = self.baseline_dataset()
        generator = torch.Generator().manual_seed(self.args.seed)
        sampler = torch.utils.data.RandomSampler(dataset, num_samples=samples, generator=generator)
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=self.args.batch_size,
            sampler=sampler,
            num_workers=self.args.workers if workers is None else workers,
            collate_fn=DataCollatorForSupervisedDataset(self.tokenizer),
            drop_last=True,
        )


def time_chunk(iterator, batches: int, stall_s: float = 0.01) -> dict:
    """Steady-state throughput of a running loader: from one stall to another at least
    `batches` batches later.

    A stall is a batch the main process had to wait for (over `stall_s`): the prefetch queue
    was empty, so what arrives between two stalls was produced between them. Batches that
    were waiting in the queue when the chunk began are read but not timed, and a reader that
    builds several batches at once (a window) delivers them in bursts, which a plain count of
    batches from an arbitrary start would misread.
    """
    arrivals: list[tuple[float, int, bool]] = []  # (time, rows, stalled)
    start: int | None = None
    cpu = time.process_time()
    while True:
        asked = time.perf_counter()
        batch = next(iterator)
        now = time.perf_counter()
        stalled = now - asked > stall_s
        arrivals.append((now, int(batch["input_ids"].shape[0]), stalled))
        if start is None:
            if stalled or len(arrivals) > 4 * batches:
                start = len(arrivals) - 1
        elif len(arrivals) - 1 - start >= batches and (stalled or len(arrivals) - 1 - start >= 4 * batches):
            break
    seconds = arrivals[-1][0] - arrivals[start][0]
    rows = sum(r for _, r, _ in arrivals[start + 1 :])
    return {
        "samples": rows,
        "seconds": round(seconds, 3),
        "samples_per_s": rows / seconds,
        "read": sum(r for _, r, _ in arrivals),
        "main_cpu_s": time.process_time() - cpu,
    }


def worker_cpu_s(iterator) -> float | None:
    """CPU seconds the loader's worker processes have used so far (Linux /proc; None elsewhere)."""
    total = 0
    for process in getattr(iterator, "_workers", []):
        try:
            fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def cpu_per_sample(setup: Setup, side: str, batches: int, costly_s: float = 0.02) -> float:
    """CPU ms per sample of one side in this process (no workers): steadier than wall time on a
    shared machine, and what each worker spends. Counted from one costly batch (one that did
    the work of reading) to another at least `batches` later, so a reader that builds several
    batches at once is charged for exactly the batches it built."""
    loader = setup.ours(workers=0) if side == "ours" else setup.baseline(10**7, workers=0)
    iterator = iter(loader)
    next(iterator)
    marks: list[tuple[float, int, bool]] = []  # (CPU time before the batch, rows, costly)
    start: int | None = None
    while True:
        before = time.process_time()
        rows = int(next(iterator)["input_ids"].shape[0])
        costly = time.process_time() - before > costly_s
        marks.append((before, rows, costly))
        if start is None:
            start = len(marks) - 1 if costly else None
        elif costly and len(marks) - 1 - start >= batches:
            break
    end = len(marks) - 1
    return 1000 * (marks[end][0] - marks[start][0]) / sum(rows for _, rows, _ in marks[start:end])


# ---- checks and stage breakdown (one process) -------------------------------------------
def _raw_samples(setup: Setup, count: int):
    from webdataset.tariterators import tarfile_samples

    seen = 0
    for shard in setup.shards:
        for raw in tarfile_samples(iter([{"url": shard}])):
            yield raw
            seen += 1
            if seen >= count:
                return


def _draft_hint(builder):
    """The transform's draft hint, if this checkout's decode_sample takes one."""
    from src.data import decode as decode_module

    takes = "draft" in decode_module.decode_sample.__code__.co_varnames
    return getattr(builder.image_transform, "draft_size", None) if takes else None


def hint_wired(setup: Setup) -> bool:
    """Does ShardStream hand the builder's draft hint to decode_sample? (one batch, in process)"""
    from src.data import decode as decode_module
    from src.data.datamodule import ShardStream

    original, seen = decode_module.decode_image, []

    def spy(data, *args, **kwargs):
        seen.append(bool(args and args[0] is not None) or kwargs.get("draft") is not None)
        return original(data, *args, **kwargs)

    decode_module.decode_image = spy
    try:
        stream = ShardStream(setup.shards[:1], setup.builder(), 2, setup.tokenizer.pad_token_id, batches_per_epoch=1)
        next(iter(stream))
    finally:
        decode_module.decode_image = original
    return any(seen)


def check_pixels(setup: Setup, count: int) -> dict:
    """Our pixels against the baseline's for the same images: the same transform. With the draft
    hint, how far a reduced decode lands from them (in 8-bit levels), over images it reduces."""
    from src.data.decode import decode_sample

    builder = setup.builder()
    transform, hint = builder.image_transform, _draft_hint(builder)
    dataset = setup.baseline_dataset()
    index = {r["id"]: i for i, r in enumerate(dataset.list_data_dict)}
    levels = torch.tensor(CLIP_STD).view(3, 1, 1) * 255
    exact, full_max, reduced, draft_mean, draft_max = 0, 0.0, 0, 0.0, 0.0
    for raw in _raw_samples(setup, 10**9):
        record, images = decode_sample(raw)
        if not images:
            continue
        theirs = dataset[index[record["id"]]]["image"]
        if exact < count:
            full_max = max(full_max, float((transform(images[0])[0] - theirs).abs().max()))
            exact += 1
        if hint is not None:
            _, small = decode_sample(raw, draft=hint)
            if small[0].size != images[0].size:
                diff = (transform(small[0])[0] - theirs).abs() * levels
                draft_mean, draft_max = max(draft_mean, float(diff.mean())), max(draft_max, float(diff.max()))
                reduced += 1
        if exact >= count and (hint is None or reduced >= count):
            break
    return {
        "images_compared": exact,
        "max_abs_diff_normalised": full_max,
        "draft_images_compared": reduced,
        "draft_worst_mean_abs_diff_levels": round(draft_mean, 3),
        "draft_max_abs_diff_levels": round(draft_max, 3),
    }


def stage_breakdown(setup: Setup, samples: int) -> dict:
    """Mean ms per sample of each stage, ours and baseline, on the first `samples` samples."""
    from src.data.decode import decode_sample

    raws = list(_raw_samples(setup, samples))
    builder = setup.builder()
    transform, encoder, hint = builder.image_transform, builder.encoder, _draft_hint(builder)
    timings: Counter = Counter()

    def clock(name: str, fn: Callable, *a, **k):
        start = time.perf_counter()
        out = fn(*a, **k)
        timings[name] += time.perf_counter() - start
        return out

    for raw in raws:
        record, images = clock("ours: decode", decode_sample, raw)
        views = [clock("ours: image transform", transform, image) for image in images]
        if hint is not None:
            _, reduced = clock("ours: decode with the draft hint", decode_sample, raw, draft=hint)
            for image in reduced:
                clock("ours: image transform of the draft decode", transform, image)
        counts = [v.shape[0] * encoder.image_tokens for v in views]
        clock("ours: tokenize + mask", encoder.encode, record["conversations"], len(images), counts)
    dataset = setup.baseline_dataset()
    processor = dataset.processor
    fill = tuple(int(x * 255) for x in processor.image_mean)
    by_id = {r["id"]: r for r in dataset.list_data_dict}
    mismatches: Counter = Counter()

    def expand_and_process(image: Image.Image) -> torch.Tensor:
        return processor.preprocess(expand2square(image, fill), return_tensors="pt")["pixel_values"][0]

    for raw in raws:
        source = by_id[json.loads(raw["json"])["id"]]
        if "image" in source:
            path = os.path.join(dataset.image_folder, source["image"])
            image = clock("baseline: open + decode", lambda p: Image.open(p).convert("RGB"), path)
            clock("baseline: expand2square + CLIP processor", expand_and_process, image)
            messages = preprocess_multimodal(copy.deepcopy(source["conversations"]))
        else:
            messages = copy.deepcopy(source["conversations"])
        clock("baseline: preprocess_v1", preprocess_v1, messages, setup.tokenizer, "image" in source, mismatches)
    out = {name: round(1000 * total / len(raws), 3) for name, total in timings.items()}
    return out | {"baseline: tokenization mismatches (count)": mismatches["tokenization_mismatch"]}


def parallel_speedup(processes: int) -> float:
    """How much faster `processes` processes finish a fixed CPU-bound job than one: what the
    cores really deliver (a shared or throttled VM gives less than `processes`)."""
    if processes <= 1:
        return 1.0
    with get_context("fork").Pool(processes) as pool:
        pool.map(_spin, [1] * processes)  # start-up
        start = time.perf_counter()
        pool.map(_spin, [1] * processes)
        many = time.perf_counter() - start
    start = time.perf_counter()
    _spin(1)
    one = time.perf_counter() - start
    return round(processes * one / many, 2)


def _spin(_: int) -> int:
    total = 0
    for i in range(3_000_000):
        total += i
    return total


# ---- main ----------------------------------------------------------------------------------
def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import PIL
    import transformers
    from PIL import features

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        "transformers": transformers.__version__,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--workdir", type=Path, default=None, help="workload folder, kept and reused (default: a temp dir, removed)")
    add("--images", type=int, default=2000, help="samples in the workload (about 90%% with an image)")
    add("--per-shard", type=int, default=100, help="samples per tar shard")
    add("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers, both sides")
    add("--batch-size", type=int, default=16, help="LLaVA-1.5's per-device batch size")
    add("--batches", type=int, default=40, help="timed batches per chunk (at least; a chunk ends on a wait)")
    add("--warmup", type=int, default=None, help="untimed batches before the first chunk (default: 4 x workers + 2)")
    add("--rounds", type=int, default=8, help="timed chunks of each side, alternating (0: none)")
    add("--settle", type=float, default=1.0, help="seconds of rest before each chunk")
    add("--cpu-rounds", type=int, default=2, help="one-process CPU-time runs of each side, alternating (0: none)")
    add("--cpu-batches", type=int, default=32, help="batches per one-process CPU-time run (at least)")
    add("--image-size", type=int, default=336)
    add("--image-tokens", type=int, default=576, help="tokens per image (CLIP-L/14-336: 576)")
    add("--max-length", type=int, default=2048)
    add("--shuffle-buffer", type=int, default=100, help="our stream's shuffle buffer (samples)")
    add(
        "--baseline-processor",
        choices=("pil", "torchvision"),
        default="pil",
        help="backend of the baseline's CLIP image processor (LLaVA's transformers had only PIL)",
    )
    add("--stage-samples", type=int, default=200, help="samples for the stage breakdown (0: skip)")
    add("--seed", type=int, default=0)
    add("--out", type=Path, default=Path("data_loader_results.json"))
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else 4 * args.workers + 2

    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="llava-loader-bench-")) if temporary else args.workdir
    try:
        manifest = generate_workload(workdir, args.images, args.seed, args.per_shard, os.cpu_count() or 1)
        setup = Setup(workdir, args)
        torch.set_num_threads(1)  # as in DataLoader workers; the stage breakdown runs in this process
        speedup = parallel_speedup(args.workers)
        wired = hint_wired(setup)
        pixels = check_pixels(setup, 20)
        stages = stage_breakdown(setup, args.stage_samples) if args.stage_samples else {}
        cpu: dict[str, list[float]] = {"ours": [], "baseline": []}
        for round_ in range(args.cpu_rounds):
            for side in ("ours", "baseline") if round_ % 2 == 0 else ("baseline", "ours"):
                cpu[side].append(round(cpu_per_sample(setup, side, args.cpu_batches), 3))
        if cpu["ours"]:
            print(f"CPU ms per sample, one process: {cpu}", flush=True)
        runs: dict[str, list[dict]] = {"ours": [], "baseline": []}
        worker_cpu: dict[str, float] = {}
        if args.rounds:
            iterators = {"ours": iter(setup.ours()), "baseline": iter(setup.baseline(10**7))}
            read = {side: 0 for side in iterators}
            for side, iterator in iterators.items():
                for _ in range(warmup):
                    read[side] += int(next(iterator)["input_ids"].shape[0])
            for round_ in range(args.rounds):
                for side in ("ours", "baseline") if round_ % 2 == 0 else ("baseline", "ours"):
                    time.sleep(args.settle)  # the other side's workers finish what they were asked for
                    result = time_chunk(iterators[side], args.batches)
                    runs[side].append(result)
                    print(
                        f"round {round_ + 1}/{args.rounds} {side:>8}: {result['samples_per_s']:7.1f} samples/s "
                        f"({result['samples']} samples in {result['seconds']:.1f} s)",
                        flush=True,
                    )
            for side, iterator in iterators.items():  # CPU of all processes per sample read, workers included
                used = worker_cpu_s(iterator)
                if used is not None:
                    main = sum(r["main_cpu_s"] for r in runs[side])
                    read[side] += sum(r["read"] for r in runs[side])
                    worker_cpu[side] = round(1000 * (used + main) / read[side], 3)
            del iterators  # shuts the workers down
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
    results: dict = {
        "machine": machine() | {"parallel_speedup": speedup},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"warmup": warmup},
        "workload": manifest,
        "draft_hint_wired": wired,
        "pixels_vs_baseline": pixels,
        "stages_ms_per_sample": stages,
        "runs": runs,
    }
    if args.rounds:
        ratios = [o["samples_per_s"] / b["samples_per_s"] for o, b in zip(runs["ours"], runs["baseline"], strict=True)]
        rate = {side: sum(r["samples"] for r in runs[side]) / sum(r["seconds"] for r in runs[side]) for side in runs}
        results |= {
            "ours_samples_per_s": round(rate["ours"], 2),
            "baseline_samples_per_s": round(rate["baseline"], 2),
            "ratio": round(rate["ours"] / rate["baseline"], 3),
            "ratio_median_of_rounds": round(statistics.median(ratios), 3),
            "ratios": [round(r, 3) for r in ratios],
            "ours_samples_per_s_per_worker": round(rate["ours"] / max(1, args.workers), 2),
            "baseline_samples_per_s_per_worker": round(rate["baseline"] / max(1, args.workers), 2),
        }
    if len(worker_cpu) == 2:
        results |= {
            "cpu_ms_per_sample_with_workers": worker_cpu,
            "cpu_ratio_with_workers": round(worker_cpu["baseline"] / worker_cpu["ours"], 3),
        }
    if cpu["ours"]:
        ours_ms, base_ms = statistics.median(cpu["ours"]), statistics.median(cpu["baseline"])
        results |= {
            "cpu_ms_per_sample": cpu,
            "cpu_ratio": round(base_ms / ours_ms, 3),
            "ours_samples_per_cpu_s": round(1000 / ours_ms, 1),
            "baseline_samples_per_cpu_s": round(1000 / base_ms, 1),
        }
    print(f"\nmachine: {results['machine']}")
    print(f"draft hint wired into ShardStream: {wired}; pixels vs baseline: {pixels}")
    if stages:
        print("stage breakdown, ms per sample (one process):")
        for name, ms in stages.items():
            print(f"  {name:<45} {ms:8.2f}")
    if cpu["ours"]:
        print(
            f"one process, CPU: ours {results['ours_samples_per_cpu_s']} samples per CPU-second, baseline "
            f"{results['baseline_samples_per_cpu_s']}: {results['cpu_ratio']:.2f}x"
        )
    if len(worker_cpu) == 2:
        print(
            f"CPU ms per sample read, all processes ({args.workers} workers): {worker_cpu}: "
            f"{results['cpu_ratio_with_workers']:.2f}x"
        )
    if args.rounds:
        for side in ("ours", "baseline"):
            print(
                f"{side + ':':<9} {results[side + '_samples_per_s']:8.1f} samples/s "
                f"({results[side + '_samples_per_s_per_worker']:.1f} per worker, {args.workers} workers)"
            )
        print(
            f"ratio ours / baseline: {results['ratio']:.2f}x (median of rounds {results['ratio_median_of_rounds']:.2f}x, "
            f"per round: {results['ratios']})"
        )
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
