"""`python -m src.export to-hf --ckpt` on something that is not a kit checkpoint: one line, exit code 2."""

from __future__ import annotations

import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from src.export import main

ROOT = Path(__file__).resolve().parents[1]


def _payload_file(path: Path, marker: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state_dict": {}, "payload": Payload()}, path)


@pytest.mark.parametrize(
    ("name", "write", "what"),
    [
        ("random.ckpt", lambda p: p.write_bytes(bytes(range(7, 256)) * 9), "binary data of no format the kit knows"),
        ("readme.ckpt", lambda p: p.write_text("not weights\n"), "a text file"),
        ("other.pkl", lambda p: p.write_bytes(pickle.dumps([1, 2, 3])), "a Python pickle that is not a torch file"),
        ("parts.zip", lambda p: zipfile.ZipFile(p, "w").close(), "a zip archive that is not a torch file (no data.pkl among its 0 members)"),
        ("state.pt", lambda p: torch.save({"llm.w": torch.zeros(1)}, p), "a torch file holding a dict with keys ['llm.w']"),
    ],
)  # fmt: skip
def test_to_hf_on_a_file_that_is_not_a_checkpoint(tmp_path: Path, capsys, name: str, write, what: str) -> None:
    path = tmp_path / name
    write(path)
    assert main(["to-hf", "--ckpt", str(path), "--out", str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == f"error: --ckpt: {path} is not a kit checkpoint: it is {what}\n"
    assert not (tmp_path / "hf").exists()


def test_to_hf_never_runs_code_in_a_checkpoint(tmp_path: Path, capsys) -> None:
    path, marker = tmp_path / "evil.ckpt", tmp_path / "pwned"
    _payload_file(path, marker)
    assert main(["to-hf", "--ckpt", str(path), "--out", str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == (
        f"error: --ckpt: {path} is not a kit checkpoint: it is a torch file holding Python objects (io.open) "
        "that no checkpoint holds (not loaded)\n"
    )
    assert not marker.exists()


def test_to_hf_on_a_folder_or_a_missing_file(tmp_path: Path, capsys) -> None:
    assert main(["to-hf", "--ckpt", str(tmp_path), "--out", str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == (
        f"error: --ckpt: {tmp_path} is not a kit checkpoint: it is a folder without the .metadata file of a "
        "distributed (FSDP2) checkpoint\n"
    )
    assert main(["to-hf", "--ckpt", str(tmp_path / "no.ckpt"), "--out", str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == f"error: --ckpt: no file {tmp_path / 'no.ckpt'}\n"


def test_to_hf_from_the_command_line_has_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "weights.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {}}))
    done = subprocess.run(
        [sys.executable, "-m", "src.export", "to-hf", "--ckpt", str(path), "--out", str(tmp_path / "hf")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert (
        done.stderr
        == f"error: --ckpt: {path} is not a kit checkpoint: it is a Python pickle that is not a torch file\n"
    )
