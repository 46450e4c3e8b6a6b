"""Loading weights into a built LlavaModel from an earlier run or an imported model.

A stage starts from what an earlier stage trained (the stage-1 projector into stage 2) or
from a released model (`python -m src.export from-hf`). Parts are all or nothing: a part
named in the file must be there whole and with the shapes this model has, so a recipe that
changed a width or a depth fails at start-up with the names, not later with wrong numbers.

Every checkpoint or weights file the kit is handed (`init_from`, `--ckpt_path`, `src.export
to-hf --ckpt`, `src.chat --ckpt`) is read here, with torch's weights-only loader: a file that
is not one (a text file, a pickle of something else, a zip that is not a torch file) is
refused with what it looks like, never with torch's advice to unpickle it without limits,
which would run whatever code the file holds.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

PARTS = ("vision", "projector", "llm")
KIT_HPARAMS = ("tokenizer", "vision", "projector", "llm")  # what every LlavaLitModule checkpoint holds
STATE_OR_CHECKPOINT = "a state dict or a kit checkpoint"  # what init_from takes
SPECIAL_CKPT_PATHS = ("best", "last", "hpc")  # Lightning's names for a checkpoint it finds itself
_MAGIC = (  # (offset, bytes, what the file is)
    (0, b"\x1f\x8b", "a gzip file"),
    (0, b"\x89PNG", "a PNG image"),
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (0, b"\x89HDF", "an HDF5 file"),
    (0, b"GGUF", "a GGUF model file"),
    (257, b"ustar", "a tar archive"),
)

_LEGACY_TORCH = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."  # torch.save's magic number, pickled (before 1.6)
_LOADABLE = ("a torch file", "a torch file (legacy format)", "a safetensors file")  # what torch.load reads


class NotACheckpoint(ValueError):
    """A file handed to the kit as a checkpoint or weights that is not one."""


def describe_file(path: str | Path) -> str:
    """What a file looks like from its first bytes, for an error message ("a text file", ...)."""
    path = Path(path)
    with path.open("rb") as file:
        head = file.read(4096)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        if not zipfile.is_zipfile(path):
            return "a damaged or truncated zip archive (a torch file cut short?)"
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(name.endswith("/data.pkl") for name in names):
            return "a torch file"
        return f"a zip archive that is not a torch file (no data.pkl among its {len(names)} members)"
    for offset, magic, what in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return what
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "a safetensors file"
    if head.startswith(_LEGACY_TORCH):
        return "a torch file (legacy format)"
    if head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a Python pickle that is not a torch file"
    if b"\0" not in head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as error:
            if error.start < len(head) - 4:  # not merely a character cut at the end of the sample
                return "binary data of no format the kit knows"
        return "a text file"
    return "binary data of no format the kit knows"


def check_loadable(path: str | Path, what: str, expected: str = "a kit checkpoint") -> str:
    """A file torch can load, judged from its first bytes only (cheap for any size); returns its kind."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no file {path}" + (" (it is a folder)" if path.is_dir() else ""))
    kind = describe_file(path)
    if kind not in _LOADABLE:  # said from its bytes, without handing it to an unpickler
        raise NotACheckpoint(f"{what}: {path} is not {expected}: it is {kind}")
    return kind


def _load(path: Path, what: str, mmap: bool, expected: str = "a kit checkpoint") -> Any:
    """`torch.load` with weights only; a file it cannot read is a `NotACheckpoint` saying what the file is."""
    kind = check_loadable(path, what, expected)
    refused = f"{what}: {path} is not {expected}: it is"
    try:  # mmap (tensors read when used) works on torch's zip format only
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and kind == "a torch file")
    except OSError:
        raise
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if kind.startswith("a torch file"):
            holds = f" ({found.group(1)})" if found else ""
            kind = f"a torch file holding Python objects{holds} that no checkpoint holds (not loaded)"
        raise NotACheckpoint(f"{refused} {kind}") from None
    except Exception as error:  # torch fails on foreign bytes in many ways (KeyError, RuntimeError, EOFError ...)
        first_line = (str(error).splitlines() or [type(error).__name__])[0][:160]
        detail = f" that torch cannot read ({first_line})" if kind in _LOADABLE else ""
        raise NotACheckpoint(f"{refused} {kind}{detail}") from None


def _content(path: Path, loaded: object) -> str:
    """What a loaded file holds, when it is not what was asked for."""
    container = "a safetensors file" if describe_file(path) == "a safetensors file" else "a torch file"
    if isinstance(loaded, dict):
        keys = sorted(map(str, loaded))
        return f"{container} holding a dict with keys {keys[:6]}{' ...' if len(keys) > 6 else ''}"
    return f"{container} holding a {type(loaded).__name__}"


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> dict:
    """A Lightning checkpoint of this kit's `LlavaLitModule`, memory-mapped (tensors are read when used).

    Checked before Lightning or torch is handed the file, so a wrong file is one line naming it.
    A folder is an FSDP2 distributed checkpoint: only its `.metadata` is looked for here.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / ".metadata").is_file():
            raise NotACheckpoint(
                f"{what}: {path} is not a kit checkpoint: it is a folder without the .metadata file of a "
                "distributed (FSDP2) checkpoint"
            )
        return {}
    loaded = _load(path, what, mmap=True)
    if not isinstance(loaded, dict) or not isinstance(loaded.get("state_dict"), dict):
        raise NotACheckpoint(f"{what}: {path} is not a kit checkpoint: it is {_content(path, loaded)}")
    hparams = loaded.get("hyper_parameters")
    if not isinstance(hparams, dict) or not all(key in hparams for key in KIT_HPARAMS):
        raise NotACheckpoint(
            f"{what}: {path} is not a kit checkpoint: it is a Lightning checkpoint of another model (its "
            f"hyper_parameters lack {[key for key in KIT_HPARAMS if key not in (hparams or {})]})"
        )
    return loaded


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a state-dict file or of a Lightning checkpoint's model (never unpickles code)."""
    path = Path(path)
    loaded = _load(path, "init_from", mmap=False, expected=STATE_OR_CHECKPOINT)
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):  # a Lightning checkpoint
        loaded = {k.removeprefix("model."): v for k, v in loaded["state_dict"].items() if k.startswith("model.")}
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise NotACheckpoint(
            f"init_from: {path} is not a state dict or a kit checkpoint: it is {_content(path, loaded)}"
        )
    return loaded


def load_parts(model: nn.Module, state: dict[str, torch.Tensor], source: str = "init_from") -> list[str]:
    """Copies whole parts (vision, projector, llm) into `model`; returns the parts loaded."""
    own = model.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    parts = [p for p in PARTS if any(k.startswith(f"{p}.") for k in state)]
    missing = sorted(k for k in own if k.split(".", 1)[0] in parts and k not in state)
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    )
    problems = []
    if unexpected:
        problems.append(f"keys this model does not have: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if missing:
        problems.append(f"keys missing from parts {parts}: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if shapes:
        problems.append("shape mismatch: " + "; ".join(shapes[:8]))
    if problems:
        raise ValueError(f"{source}: the weights do not fit this model's config; " + " | ".join(problems))
    model.load_state_dict(state, strict=False)
    return parts
