"""`python -m src.cli fit|validate|test|predict --config ...`: Lightning's CLI over the kit.

omegaconf parser mode lets recipes interpolate (`${model.init_args...}`); jsonargparse
checks every key against the classes' signatures, so a misspelt key stops the run at
once with its name instead of being silently ignored. What jsonargparse cannot know is
checked here too, right after parsing and before anything is built: component names
(projector, tower type, LLM dtype / attention / quantisation) against their registries,
that `--ckpt_path` is a checkpoint of this kit and `model.init_from` a weights file. Each stops the run with one line and
exit code 2, not a traceback from deep inside a build.

A run that fails leaves no empty `version_N` folder behind: the logger's folder is
removed when it holds nothing but the saved config (no checkpoint, no logged value).

Resuming (`src/training/resume.py`): `--ckpt_path last` is resolved here, before the Trainer runs,
to the newest checkpoint of the run's home that loads (all `version_N/checkpoints/`, a fixed
`ModelCheckpoint.dirpath`, SLURM's `hpc_ckpt_*.ckpt`); nothing found is an error (exit 2) that says
where it looked. `--ckpt_path auto` is the same, but starts a new run when there is nothing. A `fit`
that resumes from a checkpoint in a `version_N/checkpoints/` folder logs into that same `version_N`,
so the run keeps one folder and one continuous TensorBoard curve. Every `fit` gets `StopOnSignal`:
SIGTERM / SIGINT save a checkpoint at the end of the step and exit 0.

A config file may build on others (`base: [../llava15/base.yaml, ../llava15/stage1_align.yaml]`, paths
relative to its folder): each `--config F` is expanded into its files before jsonargparse reads the flags,
so it merges exactly as the same files given as repeated `--config` (`src/core/config_files.py`).
"""

from __future__ import annotations

import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from src.core.config_files import ConfigFileError, expand_config_args
from src.core.constants import DTYPES
from src.data.datamodule import LlavaDataModule
from src.data.spec import DataSpecSource
from src.model.language import ATTENTION_BACKENDS, QUANTIZATIONS
from src.model.projector import ProjectorConfig
from src.model.vision import VISION_TOWERS
from src.model.weights import (
    SPECIAL_CKPT_PATHS,
    NotACheckpoint,
    check_init_from,
    read_checkpoint,
)
from src.training.module import LlavaLitModule
from src.training.resume import (
    RESUME_FROM_NEWEST,
    RESUME_IF_ANY,
    NoCheckpoint,
    StopOnSignal,
    checkpoint_folders,
    describe_search,
    expand_folders,
    find_resume_checkpoint,
    keep_logger_version,
    log_root,
    version_of,
)

KEPT_WITHOUT_DATA = {"config.yaml", "hparams.yaml"}  # what a run writes before it has done anything


def _plain(value: Any) -> Any:
    """A jsonargparse Namespace (or anything else) as plain dicts."""
    return value.as_dict() if hasattr(value, "as_dict") else value


def _choose(key: str, value: object, known: list[str] | tuple[str, ...] | dict) -> None:
    if value not in known:
        raise ValueError(f"{key}: unknown value {value!r}; choose one of {list(known)}")


def check_component_names(model: dict) -> None:
    """Registry names in the `model:` config, so a typo stops the run before anything is built."""
    projector = model.get("projector") or {}
    try:
        ProjectorConfig(**projector)
    except ValueError as error:
        raise ValueError(f"model.projector.name: {error}") from None
    vision = model.get("vision") or {}
    towers = {"model.vision.type": vision.get("type", "timm")}
    for index, tower in enumerate(vision.get("towers") or []):
        if isinstance(tower, dict):
            towers[f"model.vision.towers[{index}].type"] = tower.get("type", "timm")
    for key, kind in towers.items():
        if kind not in VISION_TOWERS:
            raise ValueError(f"{key}: unknown {VISION_TOWERS.kind} {kind!r}; choose one of {VISION_TOWERS.names()}")
    llm = model.get("llm") or {}
    for field, known in (
        ("dtype", DTYPES),
        ("attn_implementation", ATTENTION_BACKENDS),
        ("quantization", QUANTIZATIONS),
    ):
        if field in llm:
            _choose(f"model.llm.{field}", llm[field], known)


def check_ckpt_path(ckpt_path: str | None, subcommand: str | None = "fit") -> None:
    """A local `--ckpt_path` must be a kit checkpoint; Lightning's own names and URLs are left to it."""
    if ckpt_path == RESUME_IF_ANY and subcommand != "fit":
        raise ValueError(f"--ckpt_path {RESUME_IF_ANY} is for fit (resume if there is a checkpoint); name a file")
    if (
        not ckpt_path
        or ckpt_path in (*SPECIAL_CKPT_PATHS, RESUME_IF_ANY)
        or ckpt_path.startswith("registry")
        or "://" in ckpt_path
    ):
        return
    if not Path(ckpt_path).exists():
        raise FileNotFoundError(f"--ckpt_path: no such file {ckpt_path}")
    read_checkpoint(ckpt_path, "--ckpt_path")


def _holds_data(event_file: Path) -> bool:
    """Whether a TensorBoard event file has any logged value: hyperparameters, and the `hp_metric`
    placeholder Lightning logs with them at start-up, do not count."""
    try:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    except ImportError:
        return True  # cannot tell: keep it
    try:
        for event in EventFileLoader(str(event_file)).Load():
            if any(
                value.metadata.plugin_data.plugin_name != "hparams" and value.tag != "hp_metric"
                for value in event.summary.value
            ):
                return True
    except Exception:  # a damaged file is still something the user may want to look at
        return True
    return False


def is_empty_run(folder: Path) -> bool:
    """A run folder with nothing but its config: no checkpoint, prediction or logged value."""
    for path in folder.rglob("*"):
        if path.is_dir() or path.name in KEPT_WITHOUT_DATA:
            continue
        if path.name.startswith("events.out.tfevents.") and not _holds_data(path):
            continue
        return False
    return True


def remove_empty_run_folders(trainer: Trainer) -> list[Path]:
    """After a failed run: the loggers' `version_N` folders that hold nothing, removed; returns them."""
    if not trainer.is_global_zero:
        return []
    removed = []
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if not log_dir or "://" in str(log_dir):
            continue
        folder = Path(log_dir)
        if folder.is_dir() and is_empty_run(folder):
            shutil.rmtree(folder)
            removed.append(folder)
            try:
                folder.parent.rmdir()  # `lightning_logs/` too, when this was its only run
            except OSError:
                pass
    return removed


def expanded_args(args: list[str] | None) -> list[str]:
    """The command line (`sys.argv[1:]` when `args` is None) with each `--config F` whose file names a
    `base:` expanded into its files (`src/core/config_files.py`); a base that cannot be followed is one
    line and exit code 2."""
    try:
        return expand_config_args(sys.argv[1:] if args is None else args)
    except ConfigFileError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


class KitCLI(LightningCLI):
    def parse_arguments(self, parser, args) -> None:  # noqa: ANN001 (Lightning's signature)
        if args is None:  # Lightning parses sys.argv itself then; given as `args` it would warn of both
            self.config = parser.parse_args(expanded_args(None))
        elif isinstance(args, (list, tuple)):
            super().parse_arguments(parser, expanded_args(list(args)))
        else:  # a dict or Namespace: no files to expand
            super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        try:
            check_component_names(_plain(config.get("model")) or {})
            check_ckpt_path(config.get("ckpt_path"), subcommand)
            init_from = (_plain(config.get("model")) or {}).get("init_from")
            if init_from:  # its format only: its tensors are read once, when the model is built
                check_init_from(init_from)  # a weights file, or a folder of shards (a LLaVA release)
        except (ValueError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None

    def instantiate_classes(self) -> None:
        """The model becomes the datamodule's `DataSpecSource`: the data pipeline is handed the
        tokenizer and image transform by whoever built both, and never reaches into the Trainer.
        It is asked when the first loader is made, after `configure_model` built the parts under
        the strategy (so FSDP still shards them as they appear)."""
        super().instantiate_classes()
        wire_data_spec(self.model, self.datamodule)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand == "fit" and not any(isinstance(cb, StopOnSignal) for cb in trainer.callbacks):
            trainer.callbacks.append(StopOnSignal())
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            resolve_ckpt_path(self.trainer, self.config_init[subcommand], subcommand)
        except NoCheckpoint as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            for folder in remove_empty_run_folders(self.trainer):
                print(f"removed {folder}: the run failed before it wrote anything", file=sys.stderr)
            raise


def wire_data_spec(model: object, datamodule: object) -> None:
    """`datamodule.spec_source = model`, unless the datamodule already has a spec or a source, or takes none."""
    if not isinstance(model, DataSpecSource) or not hasattr(datamodule, "spec_source"):
        return
    if datamodule.spec is None and datamodule.spec_source is None:
        datamodule.spec_source = model


@rank_zero_only
def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_ckpt_path(trainer: Trainer, config: Any, subcommand: str) -> None:
    """`--ckpt_path last` / `auto` to the run's newest valid checkpoint (in `config`, in place); and for a
    `fit` that resumes from a checkpoint of a `version_N/checkpoints/` folder, that `version_N` kept as the
    loggers' folder, so the resumed run writes its logs and checkpoints where the run it resumes did."""
    ckpt_path = config.get("ckpt_path")
    if ckpt_path in (RESUME_FROM_NEWEST, RESUME_IF_ANY):
        resume = find_resume_checkpoint(trainer)
        for path, why in resume.skipped:
            _say(f"--ckpt_path {ckpt_path}: passed over {path}, which does not load: {why}")
        if resume.path is None:
            if ckpt_path == RESUME_FROM_NEWEST:
                raise NoCheckpoint(
                    f"--ckpt_path last: no checkpoint to resume from; {describe_search(resume)}. To start a new run, "
                    "leave --ckpt_path out, or pass --ckpt_path auto (resume when there is a checkpoint, start "
                    "fresh when there is none)"
                )
            _say(f"--ckpt_path auto: no checkpoint yet ({describe_search(resume)}): starting a new run")
            config["ckpt_path"] = None
            return
        config["ckpt_path"] = str(resume.path)
        version = resume.version
        _say(f"--ckpt_path {ckpt_path}: resuming from {resume.path} (step {resume.step})")
    elif subcommand == "fit" and ckpt_path and "://" not in str(ckpt_path) and ckpt_path not in SPECIAL_CKPT_PATHS:
        version = version_of(Path(ckpt_path), log_root(trainer))
    else:
        if subcommand == "fit" and not ckpt_path:
            _note_earlier_checkpoints(trainer)
        return
    if subcommand != "fit" or version is None:
        return
    left = keep_logger_version(trainer, version)
    root = log_root(trainer)
    _say(f"logging into {root / version if root else version}, the folder of the run it resumes")
    if left:
        _say(f"these loggers keep their own run names: {', '.join(left)}")
    # it holds this run's earlier checkpoints, by design
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def _note_earlier_checkpoints(trainer: Trainer) -> None:
    """A new run where checkpoints already are: one line, so a forgotten `--ckpt_path last` is noticed."""
    found = [p for folder in expand_folders(checkpoint_folders(trainer)) for p in folder.glob("*.ckpt")]
    if found:
        newest = max(found, key=lambda p: p.stat().st_mtime)
        _say(
            f"note: starting a new run from step 0, though {newest.parent} holds checkpoints of an earlier one "
            f"(newest {newest.name}); to resume that run, pass --ckpt_path last"
        )


def main(args: list[str] | None = None) -> LightningCLI:
    torch.set_float32_matmul_precision("high")
    try:
        return KitCLI(
            LlavaLitModule,
            LlavaDataModule,
            parser_kwargs={"parser_mode": "omegaconf"},
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except NotACheckpoint as error:  # init_from: a wrong file is one line, not a traceback
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
