"""Config files that build on others (`base:`, src/core/config_files.py): the chain a file expands to, its
errors, and that every consumer (the training CLI, the SLURM launcher's parse, the sweep) merges a based
file exactly as the same files given as repeated `--config` flags."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import pytest
import yaml

from src.cli import main
from src.core.config_files import (
    ConfigFileError,
    config_chain,
    expand_config_args,
    load_merged,
    without_base,
)

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "lightning_config.yaml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """low <- mid <- top, each in its own folder, every `base:` relative to the folder of its file."""
    low = write(tmp_path / "c/low.yaml", "a: 1\nb: {x: 1, y: 1}\nlist: [1, 2, 3]\n")
    mid = write(tmp_path / "b/mid.yaml", "# the middle\nbase: [../c/low.yaml]\nb: {y: 2}\nlist: [9]\n")
    top = write(tmp_path / "a/top.yaml", "# top\nbase:\n  - ../b/mid.yaml\na: 3  # the top's own\n")
    return {"low": low, "mid": mid, "top": top}


def test_nested_bases_expand_in_merge_order_relative_to_each_files_folder(tree: dict[str, Path]) -> None:
    chain = config_chain(tree["top"])
    assert [part.path for part in chain] == [tree["low"], tree["mid"], tree["top"]]
    assert [part.text for part in chain] == [
        None,
        "# the middle\nb: {y: 2}\nlist: [9]\n",
        "# top\na: 3  # the top's own\n",
    ]


def test_later_files_override_earlier_ones_and_lists_are_replaced_whole(tree: dict[str, Path]) -> None:
    merged = load_merged([tree["top"]])
    assert dict(merged) == {"a": 3, "b": {"x": 1, "y": 2}, "list": [9]}  # no `base` key left


def test_an_absolute_base_and_a_base_shared_by_two_bases_merged_once_at_its_first_place(tmp_path: Path) -> None:
    shared = write(tmp_path / "shared.yaml", "v: shared\nw: shared\n")
    left = write(tmp_path / "left/left.yaml", f"base: [{shared}]\nv: left\n")
    right = write(tmp_path / "right.yaml", "base: [shared.yaml]\nw: right\n")
    top = write(tmp_path / "top.yaml", "base: [left/left.yaml, right.yaml]\n")
    assert [part.path for part in config_chain(top)] == [shared, left, right, top]
    assert dict(load_merged([top])) == {"v": "left", "w": "right"}  # right's shared base does not undo left


def test_a_cycle_is_one_line_naming_the_file(tmp_path: Path) -> None:
    first = write(tmp_path / "first.yaml", "base: [second.yaml]\n")
    second = write(tmp_path / "second.yaml", "base: [first.yaml]\n")
    with pytest.raises(ConfigFileError) as error:
        config_chain(first)
    assert str(error.value) == f"{first}: `base` cycle: {first} -> {second} -> {first}"
    itself = write(tmp_path / "itself.yaml", "base: [./itself.yaml]\n")
    with pytest.raises(ConfigFileError, match=r"itself.yaml: `base` cycle: .*itself.yaml -> .*itself.yaml$"):
        config_chain(itself)


def test_a_missing_base_is_one_line_naming_the_file_and_where_it_looked(tmp_path: Path) -> None:
    config = write(tmp_path / "configs/run.yaml", "base: [../nope.yaml]\n")
    with pytest.raises(ConfigFileError) as error:
        config_chain(config)
    assert str(error.value) == (
        f"{config}: `base` entry '../nope.yaml' is not a file (looked for {tmp_path / 'nope.yaml'}; paths are "
        "relative to the folder of the file that names them)"
    )


@pytest.mark.parametrize("value", ["x.yaml", "[1]", "{a: b.yaml}", "[a.yaml, null]", "['']", "null"])
def test_a_base_that_is_not_a_list_of_paths_is_an_error(tmp_path: Path, value: str) -> None:
    write(tmp_path / "x.yaml", "a: 1\n")
    config = write(tmp_path / "run.yaml", f"base: {value}\nb: 2\n")
    got = yaml.safe_load(f"v: {value}")["v"]
    with pytest.raises(ConfigFileError) as error:
        config_chain(config)
    assert str(error.value) == (
        f"{config}: `base` must be a list of config files (paths relative to this file's folder), "
        f"e.g. [../shared.yaml], got {got!r}"
    )


def test_the_base_key_is_taken_out_and_the_rest_kept_as_written(tmp_path: Path) -> None:
    block = write(tmp_path / "block.yaml", "# head\nx: 1.0e-3\nbase:\n- a.yaml\n-   b.yaml\n\n# next\ny: ${x}\n")
    assert without_base(block) == "# head\nx: 1.0e-3\n# next\ny: ${x}\n"
    flow = write(tmp_path / "flow.yaml", "{base: [a.yaml], x: 1e-3, y: '${x}', z: [1, {w: 2}]}\n")
    rest = yaml.safe_load(without_base(flow).replace("1e-3", "0.001"))  # written out by omegaconf instead
    assert rest == {"x": 0.001, "y": "${x}", "z": [1, {"w": 2}]}


def test_config_flags_expand_and_everything_else_passes_unchanged(tree: dict[str, Path], tmp_path: Path) -> None:
    plain = write(tmp_path / "plain.yaml", "a: 1\n")
    only_bases = write(tmp_path / "only.yaml", "# nothing of its own\nbase: [plain.yaml]\n")
    mid_text, top_text = (part.text for part in config_chain(tree["top"])[1:])
    argv = ["fit", f"--config={tree['top']}", "--a", "--config", "-c", str(plain), "--config", "{a: 2}"]
    assert expand_config_args(argv) == [
        "fit", "--config", str(tree["low"]), "--config", mid_text, "--config", top_text,
        "--a", "--config", "-c", str(plain), "--config", "{a: 2}",
    ]  # fmt: skip
    assert expand_config_args(["-c", str(only_bases)]) == ["-c", str(plain)]  # a file of bases adds no config
    assert expand_config_args(["--config", "missing.yaml"]) == ["--config", "missing.yaml"]  # the parser says it


# ---- the training CLI -----------------------------------------------------------------------------
def printed(args: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None), out.getvalue()[-2000:]
    return yaml.safe_load(out.getvalue())


@pytest.fixture
def based(tmp_path: Path) -> tuple[Path, Path]:
    """A run config on the demo config (relative path), and the same without its `base:`."""
    write(tmp_path / "shared/demo.yaml", DEMO.read_text())  # a copy of the demo config, named relatively
    own = "trainer:\n  max_steps: 7\n  callbacks: []\nmodel:\n  optimizer: {lr: 1.0e-4}\n"
    config = write(tmp_path / "runs/run.yaml", "base: [../shared/demo.yaml]\n" + own)
    return config, write(tmp_path / "runs/own.yaml", own)


def test_print_config_of_a_based_file_is_that_of_its_files_as_repeated_config_flags(
    based: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    config, own = based
    demo = printed(["fit", "--config", str(DEMO), "--print_config"])
    expected = printed(["fit", "--config", str(DEMO), "--config", str(own), "--print_config"])
    assert expected != demo and expected["trainer"]["max_steps"] == 7 and expected["trainer"]["callbacks"] == []
    assert expected["model"]["optimizer"]["lr"] == 1.0e-4 and expected["data"] == demo["data"]
    assert printed(["fit", "--config", str(config), "--print_config"]) == expected
    assert printed(["fit", f"--config={config}", "--print_config"]) == expected
    # as `python -m src.cli` reads it: from sys.argv
    monkeypatch.setattr(sys, "argv", ["src/cli.py", "fit", "--config", str(config), "--print_config"])
    assert printed(None) == expected


def test_a_base_error_stops_the_cli_with_one_line_and_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = write(tmp_path / "first.yaml", "base: [second.yaml]\n")
    second = write(tmp_path / "second.yaml", "base: [first.yaml]\n")
    missing = write(tmp_path / "missing.yaml", "base: [gone.yaml]\n")
    for config, message in (
        (first, f"error: {first}: `base` cycle: {first} -> {second} -> {first}\n"),
        (missing, f"error: {missing}: `base` entry 'gone.yaml' is not a file (looked for {tmp_path / 'gone.yaml'}; "
                  "paths are relative to the folder of the file that names them)\n"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(config), "--print_config"])
        assert exit_info.value.code == 2 and capsys.readouterr().err == message


# ---- the other consumers ----------------------------------------------------------------------------
def test_the_slurm_launcher_reads_a_based_recipe_as_the_cli_does(tmp_path: Path) -> None:
    from src.launch.slurm.settings import SlurmError
    from src.launch.slurm.shape import trainer_config, trainer_shape

    recipe = ROOT / "experiments/llava15_7b/stage2_finetune.yaml"
    assert trainer_shape([recipe]) == (1, 8)  # num_nodes and devices are the LLaVA-1.5 base's
    trainer = trainer_config([recipe])
    assert trainer["default_root_dir"] == "runs/llava15_7b/stage2_finetune"  # the size file's own
    assert trainer["strategy"]["class_path"] == "src.training.sharding.FSDP2Strategy"  # the stage overlay's
    with pytest.raises(SlurmError, match="`base` entry 'nope.yaml' is not a file"):
        trainer_config([write(tmp_path / "run.yaml", "base: [nope.yaml]\n")])


def test_the_launch_tools_one_line_is_the_core_one() -> None:
    from src.core import cli_config
    from src.launch import parsing

    assert parsing.one_line is cli_config.one_line
