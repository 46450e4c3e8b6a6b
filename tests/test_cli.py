"""The CLI end to end: `fit` then `test` through `python -m src.cli`, and config errors."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from src.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "lightning_config.yaml")
FAST = [
    "--trainer.max_steps=4",
    "--trainer.log_every_n_steps=1",
    "--trainer.val_check_interval=2",
    "--trainer.limit_val_batches=2",
    "--data.batch_size=4",
    "--data.samples_per_epoch=16",
    "--data.num_workers=0",
]


def _scalars(run_dir: Path) -> dict[str, list[float]]:
    (events,) = run_dir.rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_fit_then_test_through_the_cli(tmp_path: Path) -> None:
    root = tmp_path / "run"
    fit = subprocess.run(
        [sys.executable, "-m", "src.cli", "fit", "--config", CONFIG, f"--trainer.default_root_dir={root}", *FAST],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "what trains:" in fit.stdout + fit.stderr
    (last,) = root.rglob("last.ckpt")
    scalars = _scalars(root)
    assert len(scalars["train/loss"]) >= 1 and all(v > 0 for v in scalars["train/loss"])
    assert "val/mc_accuracy" in scalars and 0.0 <= scalars["val/mc_accuracy"][-1] <= 1.0
    assert {"lr-AdamW/vision", "lr-AdamW/projector", "lr-AdamW/llm"} <= set(scalars)  # one per part
    assert (root / "lightning_logs" / "version_0" / "config.yaml").is_file()

    test_dir = tmp_path / "test"
    test = subprocess.run(
        [sys.executable, "-m", "src.cli", "test", "--config", CONFIG, f"--ckpt_path={last}",
         f"--trainer.default_root_dir={test_dir}", "--trainer.limit_test_batches=2", "--data.num_workers=0",
         "--data.eval_batch_size=16", "--data.blank_images=true"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert test.returncode == 0, test.stderr[-3000:]
    scalars = _scalars(test_dir)
    for key in ("test/mc_accuracy", "test/mc_accuracy_colour", "test/mc_accuracy_count"):
        assert key in scalars, sorted(scalars)
        assert 0.0 <= scalars[key][0] <= 1.0


def _cli_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code != 0
    captured = capsys.readouterr()
    return captured.err + captured.out


def test_unknown_command_line_key_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    message = _cli_error(["fit", "--config", CONFIG, "--trainer.max_stepz=3"], capsys)
    assert "max_stepz" in message


def test_unknown_yaml_key_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = Path(CONFIG).read_text().replace("  projector:\n", "  projektor:\n", 1)
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    message = _cli_error(["fit", "--config", str(bad)], capsys)
    assert "projektor" in message


def test_unknown_projector_lists_the_valid_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    message = _cli_error(
        ["fit", "--config", CONFIG, "--model.projector.name=mlpp", f"--trainer.default_root_dir={tmp_path}", *FAST],
        capsys,
    )
    assert message == (
        "error: model.projector.name: unknown projector 'mlpp'; choose one of ['avgpool', 'c_abstractor', "
        "'identity', 'ldp', 'linear', 'mlp', 'pixel_shuffle', 'resampler']\n"
    )
    assert not any(tmp_path.iterdir())  # found when the config is read: nothing built, no run folder


def test_unknown_template_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown conversation template 'vicuna'"):
        main(["fit", "--config", CONFIG, "--data.template=vicuna", f"--trainer.default_root_dir={tmp_path}"])


def test_print_config_shows_the_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", CONFIG, "--model.projector.name=linear", "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "name: linear" in out and "train_shards:" in out and "vit_tiny_patch16_224" in out


@pytest.mark.parametrize(
    "overrides",
    [
        ["--model.projector.name=pixel_shuffle", "--model.projector.kwargs={factor: 2}"],
        ["--model.projector.name=c_abstractor", "--model.projector.kwargs={depth: 1}"],
        ["--model.projector.name=resampler", "--model.projector.kwargs={num_queries: 3, layers: 1, heads: 4}"],
        ["--model.freeze.llm=lora", "--model.llm.lora.r=4", "--model.llm.lora.alpha=8"],
        ["--model.vision.image_mode=anyres", "--model.vision.anyres_grids=[[128, 64], [64, 128]]"],
        ["--data.batching=pack", "--data.pack_length=64"],
        ["--data.batching=modality_length", "--data.resample_shards=true"],
    ],
    ids=["pixel_shuffle", "c_abstractor", "resampler", "lora", "anyres", "pack", "modality_length"],
)
def test_zoo_parts_swap_in_from_the_command_line_and_train(tmp_path: Path, overrides: list[str]) -> None:
    main(["fit", "--config", CONFIG, *overrides, f"--trainer.default_root_dir={tmp_path}", *FAST])
    losses = _scalars(tmp_path)["train/loss"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


def test_a_weighted_mixture_from_yaml_trains(tmp_path: Path) -> None:
    demo = ROOT / "data_shards/demo"
    mixture = tmp_path / "mixture.yaml"
    mixture.write_text(
        "data:\n"
        "  train_shards: null\n"
        "  train_mixture:\n"
        f"    - {{shards: '{demo}/train-{{000000..000002}}.tar', weight: 3, view: mc, name: questions}}\n"
        f"    - {{shards: 'pipe:cat {demo}/train-000003.tar', weight: 1, view: caption, samples: 400, name: captions}}\n"
    )
    main(["fit", "--config", CONFIG, "--config", str(mixture), f"--trainer.default_root_dir={tmp_path}", *FAST])
    losses = _scalars(tmp_path)["train/loss"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


class _Payload:
    """Unpickling this creates a file: a stand-in for code an untrusted checkpoint would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_untrusted_checkpoints_and_weights_are_never_unpickled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from src.model.weights import NotACheckpoint, read_state

    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload(str(marker))}, bad)
    what = (
        f"{bad} is not a kit checkpoint: it is a torch file holding Python objects (io.open) that no checkpoint holds"
    )
    message = _cli_error(
        ["test", "--config", CONFIG, f"--ckpt_path={bad}", f"--trainer.default_root_dir={tmp_path}"], capsys
    )
    assert message == f"error: --ckpt_path: {what} (not loaded)\n"
    with pytest.raises(NotACheckpoint, match="it is a torch file holding Python objects"):
        read_state(bad)
    assert not marker.exists()


def test_global_batch_size_accumulates_micro_batches(tmp_path: Path) -> None:
    cli = main(
        ["fit", "--config", CONFIG, "--data.global_batch_size=8", f"--trainer.default_root_dir={tmp_path}", *FAST]
    )
    assert cli.trainer.accumulate_grad_batches == 2  # 8 = 4 per device x 1 device x 2
    assert cli.trainer.global_step == 4
    assert cli.trainer.fit_loop.epoch_loop.batch_progress.total.completed == 8


def test_the_model_is_wired_as_the_datamodule_s_spec_source_without_being_built() -> None:
    """The CLI hands the datamodule its model as a `DataSpecSource`; the model's parts are still unbuilt
    (they are built under the strategy, in `configure_model`), and a spec given already is kept."""
    from types import SimpleNamespace

    from src.cli import KitCLI, wire_data_spec
    from src.data.datamodule import LlavaDataModule
    from src.training.module import LlavaLitModule

    cli = KitCLI(LlavaLitModule, LlavaDataModule, run=False, args=["--config", CONFIG, "--data.num_workers=0"],
                 parser_kwargs={"parser_mode": "omegaconf"})  # fmt: skip
    assert cli.datamodule.spec_source is cli.model
    assert cli.model.model is None and cli.datamodule.spec is None
    given = SimpleNamespace(spec=object(), spec_source=None)
    wire_data_spec(cli.model, given)
    assert given.spec_source is None  # a spec handed over already wins
    wire_data_spec(object(), cli.datamodule)  # not a source: nothing changes
    assert cli.datamodule.spec_source is cli.model
