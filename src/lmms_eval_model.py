"""The kit's checkpoints as an lmms-eval model: `python -m lmms_eval --model kit --model_args checkpoint=...`.

lmms-eval (0.7.3) finds models beyond its own through the Python entry-point group
`lmms_eval.models` (`ModelRegistryV2.load_entrypoint_manifests`): pyproject.toml declares
`kit = "src.lmms_eval_model:MANIFEST"`, so an installed kit (`pip install -e ".[lmms]"`)
is a registered model without a fork or a patch of lmms-eval. Only this module imports
lmms_eval; the rest of the kit works without it.

Any composition the kit trains evaluates here, not only what transformers' Llava can hold (a
timm tower, a resampler, anyres): the model is the checkpoint's `LlavaLitModule`, and every
request goes through the kit's own code, as `predict` runs it:

- prompts: the data pipeline's `prompt` view (`LlavaDataModule`'s example builder: the run's
  template, system prompt and max length, its image transform and image-token count), on the
  record `{"conversations": [{"from": "human", "value": "<image>\\n" + context}]}`, the image tags
  first unless the context has them (LLaVA's and lmms-eval's convention);
- `generate_until`: `LlavaLitModule.reply` (`src.model.generation`: greedy, or sampling when the
  task's `temperature` is above 0, as lmms-eval's llava and llava_hf decide; `max_new_tokens`,
  `top_p`, and `until` as stop strings that end and cut the reply);
- `loglikelihood`: `LlavaModel.score_candidates`, the kit's multiple-choice ranking, on the
  assistant turn `continuation` as the template supervises it in training (its end of turn
  included, as lmms-eval's own `llava` model scores it) after the prompt. It returns the *negated*
  sum of those log-probabilities (a loss, lower = more likely): lmms-eval 0.7.3's models return a
  loss there (llava, llava_hf: the mean token cross-entropy) and its `multiple_choice` scorer
  takes the argmin ("we return the actual loss in many model loglikelihood", api/task.py;
  EvolvingLMMs-Lab/lmms-eval#370), so the option picked is the one `score_candidates` ranks first.
  `is_greedy` is whether greedy generation from the prompt gives those tokens.

Model arguments (`--model_args key=value,...`): `checkpoint` (a `.ckpt` of `python -m src.cli fit`,
or an FSDP2 checkpoint folder), `config` (the run's YAML: its `data` template, system prompt and
max length win over the checkpoint's), `device` (default: cuda when available), `batch_size`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image

from src.data.conversation import IGNORE_INDEX, IMAGE_TAG
from src.data.datamodule import LlavaDataModule, collate
from src.data.samples import PROMPT_VIEW
from src.model.generation import GenerationConfig

MODEL_NAME = "kit"
MANIFEST = ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.KitModel")
"""What the `lmms_eval.models` entry point hands lmms-eval: the name and where the class lives."""

UNSUPPORTED_GEN_KWARGS = {"num_beams": 1}  # the kit has no beam search: only the value that means none passes


def chat_text(context: str, num_images: int) -> str:
    """The human turn: the image tags first, one line each, unless the context places them itself."""
    if num_images == 0 or IMAGE_TAG in context:
        return context
    return "\n".join([IMAGE_TAG] * num_images) + "\n" + context


def images_of(visuals: Any) -> list[Image.Image]:
    """lmms-eval's `doc_to_visual` output as RGB images; a video or audio input is a clear error."""
    flat: list[Any] = []
    for item in visuals or []:
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    images = []
    for item in flat:
        if not isinstance(item, Image.Image):
            raise ValueError(f"the kit's model reads images only, got {type(item).__name__} ({str(item)[:80]!r})")
        images.append(item.convert("RGB"))
    return images


def generation_config(gen_kwargs: dict, default_max_new_tokens: int) -> GenerationConfig:
    """A task's `generation_kwargs` as the kit's GenerationConfig. Sampling iff temperature > 0 (as
    lmms-eval's llava and llava_hf decide, whatever `do_sample` says); `until` are stop strings."""
    gen = dict(gen_kwargs or {})
    for key, allowed in UNSUPPORTED_GEN_KWARGS.items():
        if gen.get(key, allowed) not in (allowed, None):
            raise ValueError(
                f"generation_kwargs {key}={gen[key]!r} is not supported by the kit's model (only {allowed})"
            )
    until = gen.get("until") or []
    if isinstance(until, str):
        until = [until]
    max_new = gen.get("max_new_tokens")
    return GenerationConfig(
        max_new_tokens=int(max_new) if max_new is not None else default_max_new_tokens,
        temperature=float(gen.get("temperature") or 0.0),
        top_p=float(gen.get("top_p") or 1.0),
        seed=int(gen.get("seed") or 0),
        stop=[s for s in until if s],
    )


def _device(device: str | None) -> str:
    """The given device; else, under an lmms-eval launch of several processes, this process's GPU."""
    if device:
        return device
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class KitModel(lmms):
    """An lmms-eval model answering with a kit checkpoint; see the module docstring."""

    is_simple = True

    def __init__(
        self,
        checkpoint: str,
        config: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"unknown model_args for --model {MODEL_NAME}: {sorted(unknown)}; it takes checkpoint, config, device, "
                "batch_size"
            )
        from src.chat import data_settings
        from src.export import single_file
        from src.model.weights import read_checkpoint
        from src.training.module import LlavaLitModule

        if str(batch_size).startswith("auto"):
            batch_size = max_batch_size or 1
        self.batch_size_per_process = int(batch_size)
        if self.batch_size_per_process < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        read_checkpoint(checkpoint, "checkpoint")  # a wrong file is one line naming it
        self._device = torch.device(_device(device))
        with single_file(checkpoint) as path:
            module = LlavaLitModule.load_from_checkpoint(path, map_location="cpu")
            settings = data_settings(str(path), config)
        self.module = module.to(self._device).eval()
        self.tokenizer = module.tokenizer
        self.data = LlavaDataModule(
            template=settings["template"], system_prompt=settings["system_prompt"], max_length=settings["max_length"]
        )
        self.data.spec = module.data_spec()  # what predict's data pipeline is handed: tokenizer, transform, tokens
        self.prompts = self.data.example_builder(PROMPT_VIEW)  # the `prompt` view: chat up to the answer, as predict
        self.chats = self.data.example_builder("conversations")  # a whole chat, its reply supervised, as training
        self.pad_id = self.data.pad_id()
        self.settings = settings

    # ---- what lmms-eval asks of a model ----------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_process

    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual: Callable | None, task: str, split: str, doc_id: int) -> list[Image.Image]:
        return images_of(doc_to_visual(self._doc(task, split, doc_id))) if doc_to_visual is not None else []

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self._device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _prompt_example(self, key: str, context: str, images: list[Image.Image]):
        record = {"id": key, "conversations": [{"from": "human", "value": chat_text(context, len(images))}]}
        (example,) = self.prompts(record, images)
        return example

    @torch.no_grad()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Replies to (context, gen_kwargs, doc_to_visual, doc_id, task, split), in request order;
        requests with the same generation settings are batched."""
        default_max = self.module.generation_settings()["max_new_tokens"]
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for position, request in enumerate(requests):
            groups.setdefault(repr(sorted((request.args[1] or {}).items(), key=str)), []).append(position)
        saved = self.module.generation_config
        try:
            for positions in groups.values():
                self.module.generation_config = generation_config(requests[positions[0]].args[1], default_max)
                for chunk in _batches(positions, self.batch_size):
                    examples = []
                    for position in chunk:
                        context, _, doc_to_visual, doc_id, task, split = requests[position].args
                        images = self._visuals(doc_to_visual, task, split, doc_id)
                        examples.append(self._prompt_example(f"{task}/{split}/{doc_id}", context, images))
                    rows = self.module.reply(self._to_device(collate(examples, self.pad_id)))
                    for position, row in zip(chunk, rows, strict=True):
                        answers[position] = row["answer"]
                        self.cache_hook.add_partial("generate_until", requests[position].args[:2], row["answer"])
        finally:
            self.module.generation_config = saved
        return answers  # type: ignore[return-value]

    def _continuation(self, doc_to_target: str | Callable, task: str, split: str, doc_id: int) -> str:
        return doc_to_target if isinstance(doc_to_target, str) else str(doc_to_target(self._doc(task, split, doc_id)))

    def encode_pair(self, context: str, continuation: str, images: list[Image.Image]) -> tuple[Any, list[int]]:
        """(the prompt as `predict` encodes it, the continuation's supervised ids as training encodes the
        whole chat). The prompt of the whole chat must be the prompt alone, or the two would disagree."""
        prompt = self._prompt_example("", context, images)
        human = chat_text(context, len(images))
        chat = {"conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": continuation}]}
        (whole,) = self.chats(chat, images)
        supervised = (whole.labels != IGNORE_INDEX).nonzero().flatten()
        if len(supervised) == 0:
            raise ValueError(f"continuation {continuation!r} leaves no supervised token (cut by max_length?)")
        start = int(supervised[0])
        if whole.input_ids[:start].tolist() != prompt.input_ids.tolist():
            raise ValueError(
                f"the template tokenizes the prompt differently once continuation {continuation!r} follows it"
            )
        return prompt, whole.labels[start:][whole.labels[start:] != IGNORE_INDEX].tolist()

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(loss, is_greedy) of each (context, continuation, doc_to_visual, doc_id, task, split), the loss
        being minus `score_candidates` (see the module docstring: lmms-eval 0.7.3 takes the argmin); the
        continuations of one context (a multiple-choice question's options) share one row."""
        rows: dict[tuple, dict] = {}
        for position, request in enumerate(requests):
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            images = self._visuals(doc_to_visual, task, split, doc_id)
            prompt, ids = self.encode_pair(context, self._continuation(doc_to_target, task, split, doc_id), images)
            row = rows.setdefault((task, split, doc_id, context), {"prompt": prompt, "candidates": [], "at": []})
            row["candidates"].append(ids)
            row["at"].append(position)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for chunk in _batches(list(rows.values()), self.batch_size):
            batch = self._to_device(collate([row["prompt"] for row in chunk], self.pad_id))
            candidates = [row["candidates"] for row in chunk]
            scores = self.score(batch, candidates)
            greedy = self.greedy_tokens(batch, max(len(ids) for row in candidates for ids in row))
            for r, row in enumerate(chunk):
                for k, (position, ids) in enumerate(zip(row["at"], row["candidates"], strict=True)):
                    results[position] = (-float(scores[r, k]), greedy[r][: len(ids)] == ids)
        return results  # type: ignore[return-value]

    def score(self, batch: dict, candidates: list[list[list[int]]]) -> torch.Tensor:
        """`LlavaModel.score_candidates` on a collated batch of prompts."""
        sizes = batch.get("image_sizes")
        return self.module.model.score_candidates(
            batch["input_ids"], batch["attention_mask"].sum(dim=1), pixel_values=batch.get("pixel_values"),
            candidates=candidates, **({"image_sizes": sizes} if sizes is not None else {}),
        )  # fmt: skip

    def greedy_tokens(self, batch: dict, length: int) -> list[list[int]]:
        """Each row's greedy reply, its eos kept when it ends with one (a supervised reply ends so too)."""
        saved = self.module.generation_config
        self.module.generation_config = GenerationConfig(max_new_tokens=length)
        try:
            batch = {**batch, "meta": [{"id": str(row)} for row in range(batch["input_ids"].shape[0])]}
            replies = self._replies(batch)
        finally:
            self.module.generation_config = saved
        eos = self.tokenizer.eos_token_id
        return [reply.tokens + ([eos] if reply.finish == "eos" else []) for reply in replies]

    def _replies(self, batch: dict):
        """The generated token ids (`LlavaModel.reply`, the path `LlavaLitModule.reply` decodes)."""
        sizes = batch.get("image_sizes")
        return self.module.model.reply(
            batch["input_ids"], batch["attention_mask"].sum(dim=1), pixel_values=batch.get("pixel_values"),
            max_new_tokens=self.module.generation_config.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
            **({"image_sizes": sizes} if sizes is not None else {}),
        )  # fmt: skip

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(f"--model {MODEL_NAME} answers single-round tasks (generate_until, loglikelihood)")
