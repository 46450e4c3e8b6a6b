"""Errors a new user meets at start-up: one line, exit code 2, nothing built and no run folder left.

`--ckpt_path` and `model.init_from` files that are not checkpoints, unknown component names, and a
failed run's empty `version_N` folder; `src.chat --ckpt` on a wrong file too.
"""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from src.cli import is_empty_run, main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "lightning_config.yaml")
FAST = ["--trainer.max_steps=2", "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=0",
        "--data.batch_size=2", "--data.samples_per_epoch=4", "--data.num_workers=0"]  # fmt: skip
PROJECTORS = "['avgpool', 'c_abstractor', 'identity', 'ldp', 'linear', 'mlp', 'pixel_shuffle', 'resampler']"


def _cli_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _not_a_checkpoint(folder: Path) -> dict[str, tuple[Path, str]]:
    """Files a user might pass by mistake, and what each is said to be."""
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "notes.ckpt"
    text.write_text("step=1200 loss=0.41\n")
    pickled = folder / "scores.pkl"
    pickled.write_bytes(pickle.dumps({"state_dict": {"a": 1}}))
    archive = folder / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("readme.txt", "hi")
    noise = folder / "noise.ckpt"
    noise.write_bytes(bytes(range(256)) * 8)
    return {
        "text": (text, "a text file"),
        "pickle": (pickled, "a Python pickle that is not a torch file"),
        "zip": (archive, "a zip archive that is not a torch file (no data.pkl among its 1 members)"),
        "bytes": (noise, "binary data of no format the kit knows"),
    }


@pytest.mark.parametrize("kind", ["text", "pickle", "zip", "bytes"])
@pytest.mark.parametrize("command", ["fit", "validate", "test"])
def test_ckpt_path_that_is_not_a_checkpoint_stops_before_the_trainer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, kind: str
) -> None:
    path, what = _not_a_checkpoint(tmp_path / "files")[kind]
    root = tmp_path / "run"
    message = _cli_error(
        [command, "--config", CONFIG, f"--ckpt_path={path}", f"--trainer.default_root_dir={root}"], capsys
    )
    assert message == f"error: --ckpt_path: {path} is not a kit checkpoint: it is {what}\n"
    assert not root.exists()


def test_ckpt_path_that_does_not_exist_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "runs" / "last.ckpt"
    message = _cli_error(["test", "--config", CONFIG, f"--ckpt_path={missing}"], capsys)
    assert message == f"error: --ckpt_path: no such file {missing}\n"


def test_ckpt_path_error_from_the_command_line_has_no_traceback(tmp_path: Path) -> None:
    path, what = _not_a_checkpoint(tmp_path)["pickle"]
    done = subprocess.run(
        [sys.executable, "-m", "src.cli", "validate", "--config", CONFIG, f"--ckpt_path={path}",
         f"--trainer.default_root_dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "weights_only" not in done.stderr
    assert done.stderr.splitlines()[-1] == f"error: --ckpt_path: {path} is not a kit checkpoint: it is {what}"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.projector.name=MLP", f"model.projector.name: unknown projector 'MLP'; choose one of {PROJECTORS}"),
        ("--model.vision.type=clip", "model.vision.type: unknown vision tower type 'clip'; choose one of ['fused', 'hf', 'timm']"),
        ("--model.vision.towers=[{type: timm}, {type: siglip}]",
         "model.vision.towers[1].type: unknown vision tower type 'siglip'; choose one of ['fused', 'hf', 'timm']"),
        ("--model.llm.dtype=bf16", "model.llm.dtype: unknown value 'bf16'; choose one of ['float32', 'bfloat16', 'float16']"),
        ("--model.llm.attn_implementation=flash",
         "model.llm.attn_implementation: unknown value 'flash'; choose one of ['auto', 'flash_attention_2', 'flex_attention', 'sdpa', 'eager']"),
        ("--model.llm.quantization=int4", "model.llm.quantization: unknown value 'int4'; choose one of ['none', '4bit', '8bit']"),
    ],
    ids=["projector", "tower", "fused_tower", "dtype", "attention", "quantization"],
)  # fmt: skip
def test_unknown_component_names_stop_the_run_when_the_config_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, message: str
) -> None:
    root = tmp_path / "run"
    assert _cli_error(["fit", "--config", CONFIG, override, f"--trainer.default_root_dir={root}"], capsys) == (
        f"error: {message}\n"
    )
    assert not root.exists()


def test_an_unknown_projector_stops_the_module_config_before_any_build(demo_dir) -> None:
    from src.model.projector import ProjectorConfig
    from src.training.module import LlavaLitModule

    expected = f"unknown projector 'mlpp'; choose one of {PROJECTORS}"
    with pytest.raises(ValueError) as refused:
        ProjectorConfig(name="mlpp")
    assert str(refused.value) == expected
    with pytest.raises(ValueError) as refused:  # as a checkpoint's hyperparameters hand it over
        LlavaLitModule(str(demo_dir / "tokenizer"), projector={"name": "mlpp", "kwargs": {}})
    assert str(refused.value) == expected


def test_init_from_that_is_not_weights_stops_when_the_config_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, what = _not_a_checkpoint(tmp_path / "files")["text"]
    root = tmp_path / "run"
    message = _cli_error(
        ["fit", "--config", CONFIG, f"--model.init_from={path}", f"--trainer.default_root_dir={root}"], capsys
    )
    assert message == f"error: model.init_from: {path} is not a state dict or a kit checkpoint: it is {what}\n"
    assert not root.exists()


# ---- a failed run leaves no empty version_N folder ------------------------------------------------


def test_a_fit_that_fails_at_start_up_removes_its_empty_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / "list.pt"
    torch.save([1, 2, 3], weights)  # a torch file: passes the format check, refused when the model is built
    root = tmp_path / "run"
    kept = root / "lightning_logs" / "version_0"
    kept.mkdir(parents=True)
    (kept / "notes.txt").write_text("an earlier run's")
    message = _cli_error(
        ["fit", "--config", CONFIG, f"--model.init_from={weights}", f"--trainer.default_root_dir={root}", *FAST], capsys
    )
    assert message.splitlines()[-2:] == [
        f"removed {root / 'lightning_logs' / 'version_1'}: the run failed before it wrote anything",
        f"error: init_from: {weights} is not a state dict or a kit checkpoint: it is a torch file holding a list",
    ]
    assert sorted(p.name for p in (root / "lightning_logs").iterdir()) == ["version_0"]


def test_a_failed_fit_through_python_m_leaves_no_folder(tmp_path: Path) -> None:
    weights = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), weights)
    root = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "src.cli", "fit", "--config", CONFIG, f"--model.init_from={weights}",
         f"--trainer.default_root_dir={root}", *FAST],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"error: init_from: {weights} is not a state dict or a kit checkpoint: it is a torch file holding a Tensor"
    )
    assert list(root.rglob("version_*")) == [] and not (root / "lightning_logs").exists()


class FailAtStep(Callback):
    """Raises after `step` optimizer steps, once their losses are logged."""

    def __init__(self, step: int = 2) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError("the node went away")


def test_a_run_that_logged_values_keeps_its_folder_when_it_fails(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with pytest.raises(RuntimeError, match="the node went away"):
        main(["fit", "--config", CONFIG, f"--trainer.default_root_dir={root}", *FAST, "--trainer.max_steps=4",
              "--trainer.callbacks+=test_cli_errors.FailAtStep"])  # fmt: skip
    folder = root / "lightning_logs" / "version_0"
    assert folder.is_dir() and not is_empty_run(folder)
    assert not list(folder.rglob("*.ckpt"))  # kept for its logged losses alone


def test_what_counts_as_an_empty_run_folder(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="logs", version=0)
    logger.log_hyperparams({"lr": 0.1})
    logger.save()
    logger.finalize("failed")
    folder = Path(logger.log_dir)
    (folder / "config.yaml").write_text("seed_everything: 0\n")
    (folder / "checkpoints").mkdir()
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("events")) == [
        "checkpoints", "config.yaml", "hparams.yaml"]  # fmt: skip
    assert is_empty_run(folder)  # hyperparameters and config only
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert not is_empty_run(folder)
    (folder / "checkpoints" / "last.ckpt").unlink()
    logger = TensorBoardLogger(tmp_path, name="logs", version=0)
    logger.log_metrics({"train/loss": 2.5}, step=1)
    logger.finalize("failed")
    assert not is_empty_run(folder)


# ---- src.chat ---------------------------------------------------------------------------------------


def test_chat_on_a_file_that_is_not_a_checkpoint_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from src.chat import main as chat_main

    path, what = _not_a_checkpoint(tmp_path)["zip"]
    assert chat_main(["--ckpt", str(path), "hello?"], stdin=io.StringIO(""), stdout=io.StringIO()) == 2
    assert capsys.readouterr().err == f"error: --ckpt: {path} is not a kit checkpoint: it is {what}\n"
    assert (
        chat_main(["--ckpt", str(tmp_path / "none.ckpt"), "hello?"], stdin=io.StringIO(""), stdout=io.StringIO()) == 2
    )
    assert capsys.readouterr().err == f"error: --ckpt: no file {tmp_path / 'none.ckpt'}\n"
