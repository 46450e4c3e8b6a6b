"""src.model.weights: files that are not checkpoints are refused in one line saying what they are.

Each foreign file is written by the tool that makes such files (zipfile, tarfile, gzip, pickle,
torch.save, safetensors, Lightning's own Trainer), never by hand-made bytes that only look alike.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from safetensors.torch import save_file
from tiny_models import tiny_lit_module

from src.model.weights import NotACheckpoint, describe_file, read_checkpoint, read_state


@pytest.fixture(scope="module")
def kit_checkpoint(demo_dir, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    module = tiny_lit_module(demo_dir)
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, max_epochs=0)
    trainer.strategy.connect(module)
    module.configure_model()
    path = tmp_path_factory.mktemp("kit") / "kit.ckpt"
    trainer.save_checkpoint(path)
    return path, module


class _Payload:
    """Unpickling this creates a file: a stand-in for code an untrusted file would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes/readme.txt", "hello")
        archive.writestr("other.bin", b"\0\1")


def _tar(path: Path) -> None:
    with tarfile.open(path, "w") as archive:
        info = tarfile.TarInfo("x.txt")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"hi"))


def _lightning_of_another_model(path: Path) -> None:
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, max_epochs=0)
    trainer.strategy.connect(BoringModel())
    trainer.save_checkpoint(path)


FOREIGN = {  # name -> (writer, what the file is said to be)
    "random.ckpt": (lambda p: p.write_bytes(os.urandom(4096)), "binary data of no format the kit knows"),
    "notes.ckpt": (lambda p: p.write_text("epoch=3 step=1200\nloss 0.41\n"), "a text file"),
    "empty.ckpt": (lambda p: p.write_bytes(b""), "an empty file"),
    "dict.pkl": (lambda p: p.write_bytes(pickle.dumps({"state_dict": {}})), "a Python pickle that is not a torch file"),
    "archive.zip": (_zip, "a zip archive that is not a torch file (no data.pkl among its 2 members)"),
    "archive.tar": (_tar, "a tar archive"),
    "weights.gz": (lambda p: p.write_bytes(gzip.compress(b"x" * 100)), "a gzip file"),
    "tensor.pt": (lambda p: torch.save(torch.zeros(2), p), "a torch file holding a Tensor"),
    "list.pt": (lambda p: torch.save([1, 2], p), "a torch file holding a list"),
}


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_a_foreign_file_is_not_a_kit_checkpoint_and_says_what_it_is(tmp_path: Path, name: str) -> None:
    write, what = FOREIGN[name]
    path = tmp_path / name
    write(path)
    with pytest.raises(NotACheckpoint) as refused:
        read_checkpoint(path, "--ckpt")
    assert str(refused.value) == f"--ckpt: {path} is not a kit checkpoint: it is {what}"
    with pytest.raises(NotACheckpoint) as refused:
        read_state(path)
    assert str(refused.value) == f"init_from: {path} is not a state dict or a kit checkpoint: it is {what}"
    assert "weights_only" not in str(refused.value)  # never torch's advice to unpickle without limits


def test_code_in_a_torch_file_is_named_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload(str(marker))}, path)
    what = "a torch file holding Python objects (io.open) that no checkpoint holds (not loaded)"
    with pytest.raises(NotACheckpoint) as refused:
        read_checkpoint(path, "--ckpt")
    assert str(refused.value) == f"--ckpt: {path} is not a kit checkpoint: it is {what}"
    with pytest.raises(NotACheckpoint) as refused:
        read_state(path)
    assert str(refused.value) == f"init_from: {path} is not a state dict or a kit checkpoint: it is {what}"
    assert not marker.exists()


def test_a_pickle_of_an_object_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(
        NotACheckpoint, match="is not a kit checkpoint: it is a Python pickle that is not a torch file$"
    ):
        read_checkpoint(path)
    with pytest.raises(NotACheckpoint, match="it is a Python pickle that is not a torch file$"):
        read_state(path)
    assert not marker.exists()


def test_a_truncated_checkpoint_says_so(kit_checkpoint, tmp_path: Path) -> None:
    path = tmp_path / "cut.ckpt"
    path.write_bytes(kit_checkpoint[0].read_bytes()[:2000])
    with pytest.raises(NotACheckpoint) as refused:
        read_checkpoint(path, "--ckpt")
    assert str(refused.value) == (
        f"--ckpt: {path} is not a kit checkpoint: it is a damaged or truncated zip archive (a torch file cut short?)"
    )


def test_a_lightning_checkpoint_of_another_model_is_not_a_kit_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "boring.ckpt"
    _lightning_of_another_model(path)
    with pytest.raises(NotACheckpoint) as refused:
        read_checkpoint(path, "--ckpt_path")
    assert str(refused.value) == (
        f"--ckpt_path: {path} is not a kit checkpoint: it is a Lightning checkpoint of another model "
        "(its hyper_parameters lack ['tokenizer', 'vision', 'projector', 'llm'])"
    )


def test_state_dicts_are_weights_but_not_checkpoints(tmp_path: Path) -> None:
    state = {"projector.layers.0.weight": torch.ones(2, 3)}
    torch.save(state, tmp_path / "new.pt")
    torch.save(state, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    save_file(state, tmp_path / "w.safetensors")
    for name, container in (
        ("new.pt", "a torch file"),
        ("old.pt", "a torch file"),
        ("w.safetensors", "a safetensors file"),
    ):
        path = tmp_path / name
        loaded = read_state(path)
        assert loaded.keys() == state.keys() and torch.equal(loaded["projector.layers.0.weight"], torch.ones(2, 3))
        with pytest.raises(NotACheckpoint) as refused:
            read_checkpoint(path, "--ckpt")
        assert str(refused.value) == (
            f"--ckpt: {path} is not a kit checkpoint: it is {container} holding a dict with keys "
            "['projector.layers.0.weight']"
        )


def test_a_kit_checkpoint_reads_as_a_checkpoint_and_as_weights(kit_checkpoint) -> None:
    path, module = kit_checkpoint
    checkpoint = read_checkpoint(path, "--ckpt")
    assert checkpoint["hyper_parameters"]["tokenizer"] == module.hparams.tokenizer
    state = read_state(path)
    own = module.model.state_dict()
    assert state.keys() == own.keys()
    assert all(torch.equal(state[key], own[key]) for key in own)


def test_a_folder_needs_the_metadata_of_a_distributed_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(NotACheckpoint) as refused:
        read_checkpoint(tmp_path, "--ckpt")
    assert str(refused.value) == (
        f"--ckpt: {tmp_path} is not a kit checkpoint: it is a folder without the .metadata file of a "
        "distributed (FSDP2) checkpoint"
    )
    (tmp_path / ".metadata").write_bytes(b"")
    assert read_checkpoint(tmp_path) == {}  # its shards are read by Lightning's own loader


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"^init_from: no file {tmp_path / 'nope.pt'}$"):
        read_state(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match=r"^init_from: no weights in the folder .*: it has none of "):
        read_state(tmp_path)  # a folder is read as weight shards (tests/model/test_weights_llava.py)


def test_describe_file_knows_torch_files_from_zip_archives(tmp_path: Path) -> None:
    torch.save({"a": torch.zeros(1)}, tmp_path / "t.pt")
    _zip(tmp_path / "z.zip")
    assert describe_file(tmp_path / "t.pt") == "a torch file"
    assert describe_file(tmp_path / "z.zip").startswith("a zip archive that is not a torch file")
    (tmp_path / "u.txt").write_text("naïve café ✓\n" * 400)  # multi-byte text cut at the 4 KB sample
    assert describe_file(tmp_path / "u.txt") == "a text file"
