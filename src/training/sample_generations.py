"""`SampleGenerations`: what does the model say. Every few validations it logs a few validation
images with the model's greedy answer and the reference, to TensorBoard."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from src.core.constants import IGNORE_INDEX, IMAGE_TAG


def readable_prompt(ids: list[int], tokenizer, image_token_id: int) -> str:
    """A prompt's text with each run of image placeholders shown as one `<image>`."""
    pieces: list[str] = []
    run: list[int] = []
    for token in [*ids, None]:
        if token is not None and token != image_token_id:
            run.append(token)
            continue
        if run:
            pieces.append(tokenizer.decode(run, skip_special_tokens=True).strip())
            run = []
        if token is not None and (not pieces or pieces[-1] != IMAGE_TAG):
            pieces.append(IMAGE_TAG)
    return " ".join(piece for piece in pieces if piece)


def unnormalise(view: torch.Tensor, mean: Iterable[float], std: Iterable[float]) -> torch.Tensor:
    """A normalised (3, H, W) view back to [0, 1] pixels."""
    mean_t = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)
    return (view.detach().float().cpu() * std_t + mean_t).clamp(0.0, 1.0)


def sample_text(prompt: str, generated: str, reference: str) -> str:
    """Markdown for TensorBoard's text tab; the prompt indented, so its line breaks stay."""
    quoted = "\n".join("    " + line for line in prompt.splitlines() or [""])
    return f"**prompt**\n\n{quoted}\n\n**generated:** {generated}\n\n**reference:** {reference}"


class SampleGenerations(Callback):
    """Every `every_n_validations` validation runs, the model's greedy answers to the first
    `num_samples` rows of the first validation batch, logged to TensorBoard beside the
    reference: `<tag>/<i>/image` (the row's first image, its first view, un-normalised) and
    `<tag>/<i>/text` (prompt, generated answer, reference answer).

    A row's prompt is its tokens before its first supervised label (rows without one are
    passed over). Rank 0's rows are broadcast and every rank generates them: under FSDP each
    decoder call gathers parameters on all ranks, so all must run the same calls; only rank 0
    logs. The sanity check is skipped: an untrained model's answers tell nothing.
    """

    def __init__(
        self,
        every_n_validations: int = 1,
        num_samples: int = 4,
        max_new_tokens: int | None = None,
        tag: str = "samples",
    ) -> None:
        """
        Args:
            every_n_validations: validation runs between logs (with `val_check_interval` in steps,
                each run is at a step).
            num_samples: rows of the first validation batch to answer.
            max_new_tokens: longest answer; default: the module's `max_new_tokens`.
            tag: TensorBoard tag prefix.
        """
        super().__init__()
        if every_n_validations < 1 or num_samples < 1:
            raise ValueError("every_n_validations and num_samples must be at least 1")
        self.every_n_validations = every_n_validations
        self.num_samples = num_samples
        self.max_new_tokens = max_new_tokens
        self.tag = tag
        self.runs = 0
        self._active = False

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._active = False
        if trainer.sanity_checking:
            return
        self.runs += 1
        self._active = self.runs % self.every_n_validations == 0

    def _rows(self, batch: Mapping) -> dict | None:
        """The first rows with a supervised answer, on the CPU: ids, prompt lengths, their views."""
        labels = batch.get("labels")
        if labels is None or "input_ids" not in batch:
            return None
        answered = (labels != IGNORE_INDEX).any(dim=1).nonzero().flatten().tolist()[: self.num_samples]
        if not answered:
            return None
        return {
            "input_ids": batch["input_ids"].cpu(),
            "labels": labels.cpu(),
            "pixel_values": None if batch.get("pixel_values") is None else batch["pixel_values"].cpu(),
            "image_sizes": None if batch.get("image_sizes") is None else batch["image_sizes"].cpu(),
            "rows": answered,
        }

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._active or batch_idx != 0 or dataloader_idx != 0:
            return
        self._active = False
        mine = self._rows(batch) if trainer.is_global_zero else None
        picked = trainer.strategy.broadcast(mine, src=0)
        if picked is None:
            return
        texts, images = self.generate(pl_module, picked)
        if not trainer.is_global_zero:
            return
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not writers:
            rank_zero_warn("SampleGenerations logs to TensorBoard: add a TensorBoardLogger")
            return
        # inside fit, Lightning logs a validation's scalars at the step index of the last optimizer step
        step = trainer.global_step - 1 if trainer.state.fn == "fit" and trainer.global_step else trainer.global_step
        for writer in writers:
            for i, (text, image) in enumerate(zip(texts, images, strict=True)):
                if image is not None:
                    writer.add_image(f"{self.tag}/{i}/image", image, global_step=step)
                writer.add_text(f"{self.tag}/{i}/text", text, global_step=step)

    def generate(self, pl_module: LightningModule, picked: dict) -> tuple[list[str], list[torch.Tensor | None]]:
        """Greedy answers of the picked rows; their texts and first images."""
        model, tokenizer = pl_module.model, pl_module.tokenizer
        ids, labels, pixels, rows = picked["input_ids"], picked["labels"], picked["pixel_values"], picked["rows"]
        sizes = picked.get("image_sizes")
        spans = model.image_spans(ids, sizes)  # per row: its views, its images
        views = [span[0] for span in spans]
        mine = torch.tensor(rows)
        selected = selected_sizes = None
        if pixels is not None and any(views[row].stop > views[row].start for row in rows):
            selected = torch.cat([pixels[views[row]] for row in rows]).to(pl_module.device)
            if sizes is not None:
                selected_sizes = torch.cat([sizes[spans[row][1]] for row in rows]).to(pl_module.device)
        prompt_lengths = (labels[mine] != IGNORE_INDEX).int().argmax(dim=1)
        max_new = self.max_new_tokens or pl_module.hparams.get("max_new_tokens", 32)
        answers = model.generate(
            ids[mine].to(pl_module.device), prompt_lengths.to(pl_module.device), selected, max_new,
            tokenizer.eos_token_id, image_sizes=selected_sizes,
        )  # fmt: skip
        transform = model.vision.image_transform()
        texts, images = [], []
        for k, row in enumerate(rows):
            prompt = readable_prompt(ids[row, : int(prompt_lengths[k])].tolist(), tokenizer, pl_module.image_token_id)
            reference = tokenizer.decode(labels[row][labels[row] != IGNORE_INDEX].tolist(), skip_special_tokens=True)
            generated = tokenizer.decode(answers[k], skip_special_tokens=True)
            texts.append(sample_text(prompt, generated, reference))
            has_view = views[row].stop > views[row].start
            images.append(unnormalise(pixels[views[row].start], transform.mean, transform.std) if has_view else None)
        return texts, images


__all__ = ["SampleGenerations", "readable_prompt", "sample_text", "unnormalise"]
