"""LlavaLitModule: builds the model, decides what trains, optimises, and scores.

The heavy parts are built in `configure_model`, so later strategies (FSDP) can shard them
as they appear; the tokenizer is light and loaded at once, because data and model both
need it.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import asdict

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from transformers import AutoTokenizer

from src.core.constants import IGNORE_INDEX, IMAGE_TAG, PARTS
from src.data.spec import DataSpec
from src.data.tokenizer import prepare_tokenizer
from src.eval.answers import read_choice
from src.eval.multiple_choice import MultipleChoiceAccuracy
from src.model.generation import GenerationConfig, StopStrings, decode_reply, row_generators
from src.model.language import LLMConfig, build_llm, check_quantization
from src.model.llava import LlavaModel
from src.model.lora import apply_lora
from src.model.projector import ProjectorConfig, build_projector
from src.model.vision import VisionConfig, build_vision_tower, weights_from_hub
from src.model.weights import load_parts, read_state
from src.training.accumulation import TokenWindow, scale_gradients
from src.training.sharding import FSDPConfig, cast_frozen, checkpoint_blocks, compile_blocks, shard_model
from src.training.stage import (  # noqa: F401  (FreezeConfig, OptimizerConfig, warmup_cosine: the stage API)
    FreezeConfig,
    OptimizerConfig,
    apply_freeze,
    check_stage,
    kept_in_checkpoint,
    lr_schedule,
    parameter_groups,
    warmup_cosine,
)


def _as_config(cls: type, value: object):
    """Configs arrive as dataclasses from the CLI and as dicts from a checkpoint's hparams."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**value)
    raise TypeError(f"expected {cls.__name__} or a dict, got {type(value).__name__}")


@contextlib.contextmanager
def _oom_advice(module: LightningModule, batch: dict | None):
    """Out of memory: say which knobs free memory, in the order they cost least."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        shape = f" (this batch: {tuple(batch['input_ids'].shape)} tokens)" if batch is not None else ""
        raise RuntimeError(
            f"out of memory at step {module.global_step}{shape}. Free memory by, in this order: a smaller "
            "data.batch_size with data.global_batch_size kept (more accumulation steps); "
            "model.fsdp.activation_checkpointing: true or model.llm.gradient_checkpointing: true; "
            "model.frozen_dtype: bfloat16 and trainer.precision: bf16-mixed; FSDP2 "
            "(trainer.strategy: ModelParallelStrategy) to shard parameters and optimizer state; a shorter "
            "data.max_length; freeze.llm: lora"
        ) from error


class LlavaLitModule(LightningModule):
    def __init__(
        self,
        tokenizer: str,
        vision: VisionConfig | None = None,
        projector: ProjectorConfig | None = None,
        llm: LLMConfig | None = None,
        freeze: FreezeConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        max_new_tokens: int = 32,
        init_from: str | None = None,
        fsdp: FSDPConfig | None = None,
        frozen_dtype: str | None = None,
        max_bad_steps: int = 10,
        generation: GenerationConfig | None = None,
    ) -> None:
        """
        Args:
            tokenizer: hub id or folder of the tokenizer; `<image>` and a pad token are added when missing.
            vision: the vision tower.
            projector: the projector by registered name.
            llm: the language model.
            freeze: what trains, per part.
            optimizer: AdamW with linear warm-up and cosine decay.
            max_new_tokens: longest generated reply when evaluating (`reasoned` multiple choice).
            init_from: weights to start from: a state-dict file (`python -m src.export from-hf`) or a
                Lightning checkpoint of an earlier stage; each part it holds (vision, projector, llm)
                is loaded whole, and a key or shape mismatch is an error.
            fsdp: sharding and precision under `ModelParallelStrategy` (FSDP2); with another strategy only
                its `activation_checkpointing` and `compile_blocks` apply.
            frozen_dtype: store parts that do not train at all in this dtype (`bfloat16` halves their memory).
            max_bad_steps: a step whose loss is NaN or infinite on any rank is skipped and counted
                (`train/skipped_nonfinite`); this many in a row stop the run, leaving its last checkpoint.
            generation: how `predict` (and `src.chat`) generate: max_new_tokens (default: the one above),
                temperature (0: greedy), top_p, seed, stop strings.
        """
        super().__init__()
        # generation settings are chosen at predict time, not trained: kept out of checkpoints, since
        # LightningCLI lets a checkpoint's hyperparameters override the command line (`--ckpt_path`)
        self.save_hyperparameters(ignore=["generation"])
        self.vision_config = _as_config(VisionConfig, vision)
        self.projector_config = _as_config(ProjectorConfig, projector)
        self.llm_config = _as_config(LLMConfig, llm)
        self.freeze_config = _as_config(FreezeConfig, freeze)
        self.optimizer_config = _as_config(OptimizerConfig, optimizer)
        self.fsdp_config = _as_config(FSDPConfig, fsdp)
        self.generation_config = _as_config(GenerationConfig, generation)
        # checkpoints keep plain dicts, as the CLI writes them, so they load with torch's weights_only default
        for key in ("vision", "projector", "llm", "freeze", "optimizer", "fsdp"):
            self.hparams[key] = asdict(getattr(self, f"{key}_config"))
        check_stage(self.freeze_config, self.optimizer_config)
        if self.llm_config.quantization != "none" and self.freeze_config.llm == "full":
            raise ValueError("a quantised LLM cannot train in full: use freeze.llm lora (QLoRA) or frozen")
        check_quantization(self.llm_config)  # before any data or weights load
        # the LLM's trust_remote_code covers its tokenizer, and nothing else
        loaded = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=self.llm_config.trust_remote_code)
        self.tokenizer = prepare_tokenizer(loaded)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TAG)
        self.model: LlavaModel | None = None
        self.init_parts: set[str] = set()  # parts init_from loaded
        self.val_mc = MultipleChoiceAccuracy()
        self.test_mc = MultipleChoiceAccuracy()
        self.skipped: Counter[str] = Counter()
        self.bad_steps = 0  # non-finite losses in a row
        self.bad_total = 0
        self.window = TokenWindow()  # the micro-batches since the last optimizer step

    # ---- building -------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        vision = build_vision_tower(self.vision_config)
        llm = build_llm(self.llm_config, vocab_size=len(self.tokenizer))
        projector = build_projector(
            self.projector_config,
            vision.hidden_size,
            llm.config.get_text_config().hidden_size,
            vision.grid,
            vision.num_prefix_tokens,
        )
        self.model = LlavaModel(vision, projector, llm, self.image_token_id)
        if self.hparams.init_from:  # before LoRA wraps the LLM, so the keys are the plain model's
            parts = load_parts(self.model, read_state(self.hparams.init_from))
            self.init_parts = set(parts)
            rank_zero_info(f"init_from {self.hparams.init_from}: loaded {', '.join(parts) or 'nothing'}")
        if self.freeze_config.llm == "lora":
            self.model.llm = apply_lora(self.model.llm, self.llm_config.lora)
        self.apply_freeze()
        cast = cast_frozen(self.model, self.hparams.frozen_dtype)
        if cast:
            rank_zero_info(f"frozen parts stored in {self.hparams.frozen_dtype}: {', '.join(cast)}")
        if self.fsdp_config.activation_checkpointing:
            by_hf = self.llm_config.gradient_checkpointing  # transformers' own checkpointing has the decoder layers
            counts = checkpoint_blocks(self.model, llm=not by_hf)
            layers = (
                "decoder layers by model.llm.gradient_checkpointing" if by_hf else f"{counts['llm']} decoder layers"
            )
            rank_zero_info(f"activation checkpointing: {counts['vision']} tower blocks, {layers}")
        if self.fsdp_config.compile_blocks:
            rank_zero_info(f"torch.compile: {compile_blocks(self.model)} decoder layers")
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over its data-parallel dimension
            units = shard_model(self.model, self.device_mesh["data_parallel"], self.fsdp_config)
            rank_zero_info(f"FSDP2: {len(units)} units (per block, tower, projector, per decoder layer, root)")

    def apply_freeze(self) -> None:
        assert self.model is not None
        apply_freeze(self.model, self.freeze_config)
        counts = self.parameter_counts()
        lines = [
            f"  {part:<10} {getattr(self.freeze_config, part):<7} {counts[part][0]:>14,d} trainable "
            f"of {counts[part][1]:>14,d}"
            for part in PARTS
        ]
        trainable = sum(t for t, _ in counts.values())
        rank_zero_info("what trains:\n" + "\n".join(lines) + f"\n  {'total':<18} {trainable:>14,d} trainable")

    def parameter_counts(self) -> dict[str, tuple[int, int]]:
        """Per part: (trainable, all) parameters; a LoRA adapter counts with its LLM."""
        assert self.model is not None
        counts = {}
        for part in PARTS:
            params = list(getattr(self.model, part).parameters())
            counts[part] = (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
        return counts

    # ---- checkpoints hold what the config cannot rebuild -----------------------------
    def rebuildable_parts(self) -> set[str]:
        """Parts whose weights the config reproduces exactly: hub / pretrained weights or init_from."""
        parts = set(self.init_parts)
        if self.llm_config.name is not None:
            parts.add("llm")
        if weights_from_hub(self.vision_config):  # each tower family says so itself
            parts.add("vision")
        return parts

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        rebuildable = self.rebuildable_parts()
        if not rebuildable or "state_dict" not in checkpoint or self.device_mesh is not None:
            return  # FSDP2's distributed checkpoints are loaded key for key into the sharded model: keep all
        keep = {f"model.{key}" for key in kept_in_checkpoint(self.model, rebuildable)}
        state = checkpoint["state_dict"]
        dropped = [key for key in state if key.startswith("model.") and key not in keep]
        for key in dropped:
            del state[key]
        checkpoint["rebuilt_parts"] = sorted(rebuildable)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Puts back the rebuilt parts' weights, as this run built them, so loading stays strict."""
        rebuilt = checkpoint.get("rebuilt_parts")
        if not rebuilt or "state_dict" not in checkpoint:
            return
        self.configure_model()
        state = checkpoint["state_dict"]
        for key, value in self.model.state_dict().items():
            if key.split(".", 1)[0] in rebuilt:
                state.setdefault(f"model.{key}", value)

    def data_spec(self) -> DataSpec:
        """What the data pipeline needs of the model, and nothing more (`src.data.spec`).

        The transform and token counts come from the built parts: asked before `configure_model`
        ran (outside a Trainer), it builds them here.
        """
        self.configure_model()
        assert self.model is not None
        return DataSpec(
            tokenizer=self.tokenizer,
            image_transform=self.model.vision.image_transform(),
            image_tokens=self.model.image_tokens,
            image_token_count=self.model.image_token_count,  # anyres: tokens per image follow its size
        )

    # ---- steps ----------------------------------------------------------------------
    def forward(self, batch: dict):
        """A padded batch has an `attention_mask`; a packed one (`collate_packed`) has `position_ids` and none."""
        return self.model(
            batch["input_ids"],
            batch.get("attention_mask"),
            batch.get("pixel_values"),
            batch.get("labels"),
            position_ids=batch.get("position_ids"),
            image_sizes=batch.get("image_sizes"),
        )

    def _count_skips(self, batch: dict, stage: str) -> None:
        skipped = batch.pop("skipped", None) or {}
        for reason, n in skipped.items():
            self.skipped[f"{stage}/{reason}"] += n
        if skipped or stage == "train":
            for key, n in self.skipped.items():
                if key.startswith(stage):
                    self.log(f"data/skipped_{key.replace('/', '_')}", float(n), on_step=True, on_epoch=False)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        self._count_skips(batch, "train")
        with _oom_advice(self, batch):
            out = self(batch)
        bad, step_tokens = self._step_stats(out.loss, out.supervised_tokens)
        if self._nonfinite(bad):
            return self._skipped_step(out.loss.device)
        return self._token_weighted_loss(out.loss, out.supervised_tokens, step_tokens)

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        with _oom_advice(self, None):
            super().backward(loss, *args, **kwargs)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Runs Lightning's closure (the last micro-batch's step and backward), then puts the window's
        gradients on its token mean, before the gradient-norm callbacks, clipping and the optimizer."""

        def closure():
            result = optimizer_closure()
            self._end_window()
            return result

        optimizer.step(closure=closure if optimizer_closure is not None else None)

    def _step_stats(self, loss: torch.Tensor, tokens: int) -> tuple[float, float]:
        """(ranks whose loss is NaN or infinite, supervised tokens of all ranks) in one collective."""
        stats = torch.tensor([float(not torch.isfinite(loss).all()), float(tokens)], device=loss.device)
        if self.trainer.world_size > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        bad, step_tokens = stats.tolist()
        return bad, step_tokens

    def _skipped_step(self, device: torch.device) -> torch.Tensor | None:
        """What a skipped micro-batch returns: None (Lightning skips backward) in one process. With
        several, Lightning refuses None (it cannot know every rank skips), so every rank returns a
        leaf zero instead: its backward reaches no parameter and runs no collective, so nothing of the
        bad micro-batch enters a gradient; the window's other micro-batches still count."""
        if self.trainer.world_size > 1:
            return torch.zeros((), device=device, requires_grad=True)
        return None

    def _nonfinite(self, bad: float) -> bool:
        """True when any rank's loss is NaN or infinite (`bad` ranks): every rank skips, or DDP would hang."""
        if bad == 0:
            self.bad_steps = 0
            return False
        self.bad_steps += 1
        self.bad_total += 1
        self.log("train/skipped_nonfinite", float(self.bad_total), batch_size=1)
        rank_zero_warn(f"step {self.global_step}: non-finite loss, step skipped ({self.bad_steps} in a row)")
        if self.bad_steps >= self.hparams.max_bad_steps:
            raise RuntimeError(
                f"{self.bad_steps} steps in a row had a NaN or infinite loss (step {self.global_step}); the run "
                "stops with its last checkpoint intact. Lower optimizer.lr, raise warm-up, use bf16 rather than "
                "fp16, or look for broken samples"
            )
        return True

    def _token_weighted_loss(self, loss: torch.Tensor, tokens: int, step_tokens: float) -> torch.Tensor:
        """This rank's micro-batch loss, weighted so that the optimizer step sees the mean over every
        supervised token of its global batch, over ranks and accumulation micro-batches alike.

        DDP and FSDP average gradients over ranks and Lightning divides each micro-batch by the
        accumulation steps: a plain mean per micro-batch would weight a token of a short micro-batch
        more than one of a long one. Each micro-batch backpropagates its token sum times
        `ranks / first`, and `_end_window` rescales the gradients by `accumulate x first / window
        tokens` (`src.training.accumulation`): exactly what one process computes on the whole batch.
        """
        return loss * self.window.weight(loss, tokens, step_tokens, self.trainer.world_size)

    def _end_window(self) -> None:
        """After the window's last backward: gradients to the window's token mean; logs its loss."""
        window, self.window = self.window, TokenWindow()
        if window.first is None:  # every micro-batch was skipped, on every rank alike
            return
        stats = window.local_stats(self.device)
        if self.trainer.world_size > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        loss_sum, tokens = stats.tolist()
        factor = window.gradient_factor(tokens, self.trainer.accumulate_grad_batches)
        if factor != 1.0:
            scale_gradients(self.parameters(), factor)
        self.log("train/supervised_tokens", tokens, batch_size=1)
        if tokens > 0:
            self.log("train/loss", loss_sum / tokens, prog_bar=True, batch_size=1)

    def _evaluate(self, batch: dict, stage: str, metric: MultipleChoiceAccuracy) -> None:
        self._count_skips(batch, stage)
        if batch.get("empty"):
            return  # only skip counts from a reader that built no example
        if batch.get("filler"):  # keeps the ranks in lockstep (LockstepBatches): run as the others do, discard
            self(batch)
            if "mc_answer" in batch:
                self.choose(batch)
            return
        out = self(batch)
        size = batch["input_ids"].shape[0]
        self.log(f"{stage}/loss", out.loss, batch_size=size, sync_dist=True)
        if "mc_answer" in batch:
            predicted, answer, types = self.choose(batch)
            metric.update(predicted, answer, types)

    def choose(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """The model's option per multiple-choice row (see MC_FORMATS): the candidate reply it
        ranks highest for `letter` and `option`; for `reasoned`, the letter its greedy reply
        names ("The answer is X"), or -1 (wrong) when it names none."""
        rows = (batch["mc_answer"] >= 0).nonzero().flatten()
        if len(rows) != batch["input_ids"].shape[0]:
            raise ValueError("a multiple-choice evaluation batch must hold only questions")
        prompt_lengths = (batch["labels"] != IGNORE_INDEX).int().argmax(dim=1)
        candidates = batch["mc_candidates"]
        if batch["mc_format"] == "reasoned":
            replies = self.model.generate(
                batch["input_ids"], prompt_lengths, batch.get("pixel_values"),
                self.hparams.max_new_tokens, self.tokenizer.eos_token_id,
                all_done=self._all_ranks_done if self.device_mesh is not None else None,
                image_sizes=batch.get("image_sizes"),
            )  # fmt: skip
            picked = []
            for reply, options in zip(replies, candidates, strict=True):
                text = self.tokenizer.decode(reply, skip_special_tokens=True).strip()  # as predict writes it
                choice = read_choice(text, len(options), "official")  # the paper's scorer's rule: see answers.py
                picked.append(-1 if choice is None else choice)
            predicted = torch.tensor(picked, device=rows.device)
        else:
            scores = self.model.score_candidates(
                batch["input_ids"], prompt_lengths, batch.get("pixel_values"), candidates,
                image_sizes=batch.get("image_sizes"),
            )  # fmt: skip
            predicted = scores.argmax(dim=1)
        return predicted, batch["mc_answer"], list(batch["mc_type"])

    # ---- prediction -----------------------------------------------------------------
    def generation_settings(self) -> dict:
        """The settings replies are generated with, as written beside each prediction."""
        cfg = self.generation_config
        max_new = cfg.max_new_tokens if cfg.max_new_tokens is not None else self.hparams.max_new_tokens
        return {"max_new_tokens": max_new, "temperature": cfg.temperature, "top_p": cfg.top_p if cfg.sampling else 1.0,
                "seed": cfg.seed if cfg.sampling else None, "stop": list(cfg.stop)}  # fmt: skip

    def reply(self, batch: dict) -> list[dict]:
        """Generated replies to a batch of prompts (right-padded `input_ids`, `attention_mask`, `meta`)."""
        cfg, settings = self.generation_config, self.generation_settings()
        meta = batch["meta"]
        generators = row_generators(cfg.seed, [m["id"] for m in meta], self.device) if cfg.sampling else None
        replies = self.model.reply(
            batch["input_ids"], batch["attention_mask"].sum(dim=1), batch.get("pixel_values"),
            settings["max_new_tokens"], self.tokenizer.eos_token_id, temperature=cfg.temperature, top_p=cfg.top_p,
            generators=generators, stop=StopStrings(self.tokenizer, cfg.stop) if cfg.stop else None,
            all_done=self._all_ranks_done if self.device_mesh is not None else None,
            image_sizes=batch.get("image_sizes"),
        )  # fmt: skip
        return [
            {
                "id": m["id"],
                "index": m.get("index"),
                "prompt": m.get("prompt", ""),
                "answer": decode_reply(self.tokenizer, r, cfg.stop),
                "reference": m.get("reference"),
                "finish": r.finish,
            }
            for m, r in zip(meta, replies, strict=True)
        ]

    def _all_ranks_done(self, local_done: bool) -> bool:
        """Under FSDP every rank must make the same decoder calls: generation ends when all are done."""
        flag = torch.tensor(0.0 if local_done else 1.0, device=self.device)
        return float(self.trainer.strategy.reduce(flag, reduce_op="sum")) == 0.0

    def on_predict_start(self) -> None:
        from lightning.pytorch.callbacks import BasePredictionWriter

        if not any(isinstance(c, BasePredictionWriter) for c in self.trainer.callbacks):
            rank_zero_warn(
                "predict has no prediction writer: add src.eval.predictions.PredictionWriter to trainer.callbacks "
                "(lightning_config.yaml has it) to get the answers as JSONL"
            )

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """One dict per prompt: id, index (order in the input), prompt, answer, reference, finish.
        Skipped samples are counted (`self.skipped`, reported by the writer): predict cannot log."""
        for reason, n in (batch.pop("skipped", None) or {}).items():
            self.skipped[f"predict/{reason}"] += n
        if batch.get("empty"):
            return []
        if "meta" not in batch:
            raise ValueError("a predict batch needs `meta` per row: read data with data.predict_shards / predict_json")
        replies = self.reply(batch)
        return [] if batch.get("filler") else replies  # a filler keeps the ranks in lockstep (LockstepBatches)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_mc)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_mc)

    def _log_mc(self, stage: str, metric: MultipleChoiceAccuracy) -> None:
        result = metric.compute()
        metric.reset()
        for name, value in result.items():
            key = f"{stage}/mc_accuracy" if name == "all" else f"{stage}/mc_accuracy_{name}"
            self.log(key, value, prog_bar=name == "all")

    def on_validation_epoch_end(self) -> None:
        self._log_mc("val", self.val_mc)

    def on_test_epoch_end(self) -> None:
        self._log_mc("test", self.test_mc)

    # ---- optimisation ---------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.optimizer_config
        groups = parameter_groups(self.model, cfg)
        fused = cfg.fused
        if fused is None:
            fused = all(p.is_cuda for g in groups for p in g["params"])
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused or None)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = lr_schedule(optimizer, cfg, total)  # transformers' cosine with warm-up, step for step
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
