"""Loading weights into a built LlavaModel from an earlier run or an imported model.

A stage starts from what an earlier stage trained (the stage-1 projector into stage 2) or
from a released model (`python -m src.export from-hf`), or from LLaVA's own released files: a
stage-1 `mm_projector.bin`, or a LLaVA-1.5 checkpoint folder (`LlavaLlamaForCausalLM` shards),
whose names (`model.mm_projector.*`, `model.vision_tower.vision_tower.*`, `model.layers.*`,
`lm_head.*`: the modules `llava_arch.py` and `multimodal_projector/builder.py` build) are mapped
onto the kit's parts. Parts are all or nothing: a part named in the file must be there whole
and with the shapes this model has, so a recipe that changed a width or a depth fails at
start-up with the names, not later with wrong numbers.

Every checkpoint or weights file the kit is handed (`init_from`, `--ckpt_path`, `src.export
to-hf --ckpt`, `src.chat --ckpt`) is read here, with torch's weights-only loader: a file that
is not one (a text file, a pickle of something else, a zip that is not a torch file) is
refused with what it looks like, never with torch's advice to unpickle it without limits,
which would run whatever code the file holds.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from src.core.constants import PARTS

log = logging.getLogger(__name__)

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
    """Tensors of a state-dict file, of a Lightning checkpoint's model, or of a folder of
    transformers-style weight shards (a LLaVA-1.5 release); never unpickles code."""
    path = Path(path)
    if path.is_dir():
        return _read_shards(path)
    loaded = _load(path, "init_from", mmap=False, expected=STATE_OR_CHECKPOINT)
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):  # a Lightning checkpoint
        loaded = {k.removeprefix("model."): v for k, v in loaded["state_dict"].items() if k.startswith("model.")}
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise NotACheckpoint(
            f"init_from: {path} is not a state dict or a kit checkpoint: it is {_content(path, loaded)}"
        )
    return loaded


def load_parts(model: nn.Module, state: dict[str, torch.Tensor], source: str = "init_from") -> list[str]:
    """Copies whole parts (vision, projector, llm) into `model`; returns the parts loaded.

    A state in LLaVA's names (`is_llava_layout`) is mapped onto the kit's first (`from_llava`)."""
    if is_llava_layout(state):
        state = from_llava(state, model, source)
    own = model.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    parts = [p for p in PARTS if any(k.startswith(f"{p}.") for k in state)]
    missing = sorted(k for k in own if k.split(".", 1)[0] in parts and k not in state)
    if KIT_NEWLINE in missing and "projector" in parts:
        # a projector trained on single views (LLaVA-1.5's stage 1, and LLaVA-NeXT's, whose stage 2 starts
        # image_newline at its initialisation): the newline keeps this model's, said aloud
        missing.remove(KIT_NEWLINE)
        log.warning(
            "%s: the projector weights have no %s (a projector trained without anyres unpad); it keeps its "
            "initialisation, as LLaVA-NeXT's stage 2 starts it", source, KIT_NEWLINE,
        )  # fmt: skip
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


# ---- LLaVA's own released files ------------------------------------------------------------
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")  # transformers' names
SINGLE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
LLAVA_PROJECTOR = "model.mm_projector."  # LlavaMetaModel.mm_projector (build_vision_projector)
LLAVA_TOWER = "model.vision_tower.vision_tower."  # CLIPVisionTower.vision_tower, a transformers CLIPVisionModel
LLAVA_NEWLINE, KIT_NEWLINE = "model.image_newline", "projector.anyres.image_newline"  # LLaVA-NeXT
CLIP_INNER = "vision_model."  # CLIPVisionModel.vision_model in transformers 4
LLAVA_HEAD = "lm_head."  # LlavaLlamaForCausalLM.lm_head; every other `model.` key is its LlamaModel's


def check_init_from(path: str | Path, what: str = "model.init_from") -> None:
    """`init_from` names a weights file, or a folder of weight shards whose files look loadable
    (judged from their first bytes, as `check_loadable`)."""
    path = Path(path)
    if path.is_dir():
        for shard in _shard_files(path, what):
            check_loadable(shard, what, "a weights shard")
    else:
        check_loadable(path, what, STATE_OR_CHECKPOINT)


def _shard_files(folder: Path, what: str = "init_from") -> list[Path]:
    """The weight files of a transformers-style checkpoint folder: those its index names, or its one file."""
    for name in SHARD_INDEXES:
        index = folder / name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as error:
                raise NotACheckpoint(f"{what}: {index} is not a weights index (no weight_map: {error})") from None
            return [folder / shard for shard in sorted(set(weight_map.values()))]
    for name in SINGLE_WEIGHTS:
        if (folder / name).is_file():
            return [folder / name]
    raise FileNotFoundError(
        f"{what}: no weights in the folder {folder}: it has none of {[*SHARD_INDEXES, *SINGLE_WEIGHTS]}"
    )


def _read_shards(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder; torch shards are memory-mapped (read when copied)."""
    state: dict[str, torch.Tensor] = {}
    for shard in _shard_files(folder):
        loaded = _load(shard, "init_from", mmap=True, expected="a weights shard")
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise NotACheckpoint(f"init_from: {shard} is not a weights shard: it is {_content(shard, loaded)}")
        state.update(loaded)
    return state


def is_llava_layout(state: dict[str, torch.Tensor]) -> bool:
    """Keys in LLaVA's names (`model.*`, `lm_head.*`) rather than the kit's (`vision.*`, `projector.*`, `llm.*`)."""
    ours = any(key.split(".", 1)[0] in PARTS for key in state)
    return not ours and any(key.startswith(("model.", LLAVA_HEAD)) for key in state)


def _projector_prefix(projector: nn.Module, source: str) -> str:
    """Where LLaVA's `mm_projector` keys go: its `linear` is one nn.Linear (`weight`), its
    `mlpNx_gelu` an nn.Sequential of Linear, GELU, Linear ... (`0.weight`, `2.weight`, ...)."""
    from src.model.projector import LinearProjector, MLPProjector

    if isinstance(projector, MLPProjector) and all(
        isinstance(m, nn.Linear if i % 2 == 0 else nn.GELU) for i, m in enumerate(projector.layers)
    ):
        return "projector.layers."
    if isinstance(projector, LinearProjector):
        return "projector.proj."
    raise ValueError(
        f"{source}: LLaVA's mm_projector maps onto projector `mlp` (mlpNx_gelu, depth N) or `linear`, "
        f"not onto this model's {type(projector).__name__}"
    )


def _tower_prefix(model: nn.Module, source: str) -> str:
    """LLaVA's tower is a transformers CLIPVisionModel, so the kit's must be one too (vision.type: hf)."""
    model_type = getattr(getattr(getattr(model.vision, "model", None), "config", None), "model_type", None)
    if model_type != "clip_vision_model":
        kind = type(model.vision).__name__ if model_type is None else f"a transformers {model_type!r} tower"
        raise ValueError(
            f"{source}: LLaVA's vision tower (keys {LLAVA_TOWER}*) is a transformers CLIPVisionModel; this model's "
            f"tower is {kind} (use vision.type: hf with a CLIP config or hub id)"
        )
    return "vision.model."


def _tower_key(key: str, nested: bool) -> str:
    """A CLIPVisionModel key as this transformers version names it: LLaVA's files (transformers 4)
    nest everything under `vision_model.`; transformers 5's CLIPVisionModel has no such level."""
    if nested:
        return key if key.startswith(CLIP_INNER) else CLIP_INNER + key
    return key.removeprefix(CLIP_INNER)


def _pruned_tower_keys(model: nn.Module) -> re.Pattern | None:
    """The kit keeps a tower's layers up to the feature layer only; LLaVA's files hold all of them
    (it runs them and reads hidden_states[-2]). Those the kit pruned are dropped, no others."""
    tower = model.vision
    layers = getattr(getattr(tower, "family", None), "layers", None)
    if layers is None or tower.layer + 1 >= tower.full_depth:
        return None
    pruned = "|".join(str(i) for i in range(tower.layer + 1, tower.full_depth))
    return re.compile(rf"^vision\.model\.{re.escape(layers)}\.({pruned})\.")


def _vocab_rows(
    model: nn.Module, own: dict[str, torch.Tensor], mapped: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """LLaVA-1.5's embeddings have the base tokenizer's rows (32,000); the kit's cover its own
    tokenizer (with `<image>`) rounded up to 64. The file's rows are copied; the rows beyond are
    their mean, as `build_llm` makes new rows (never produced by the data, hidden from decoding)."""
    llm = model.llm
    names = {
        f"llm.{name}"
        for name, param in llm.named_parameters(remove_duplicate=False)
        if param is llm.get_input_embeddings().weight or param is llm.get_output_embeddings().weight
    }
    for key in names & mapped.keys():
        file_rows, model_rows = mapped[key], own[key]
        if file_rows.shape[1:] == model_rows.shape[1:] and file_rows.shape[0] < model_rows.shape[0]:
            grown = torch.empty(model_rows.shape, dtype=file_rows.dtype)
            grown[: file_rows.shape[0]] = file_rows
            grown[file_rows.shape[0] :] = file_rows.float().mean(0).to(file_rows.dtype)
            mapped[key] = grown
    return mapped


def from_llava(state: dict[str, torch.Tensor], model: nn.Module, source: str = "init_from") -> dict[str, torch.Tensor]:
    """LLaVA's names mapped onto the kit's `model` (a LlavaModel): `model.mm_projector.*` to the
    projector, `model.vision_tower.vision_tower.*` to the tower, the rest of `model.*` and
    `lm_head.*` to the LLM, LLaVA-NeXT's `model.image_newline` to the projector's (anyres with
    unpad). Other keys are kept as they are, so `load_parts` names them as keys this model does
    not have."""
    llm_base = f"llm.{model.llm.base_model_prefix}."
    head = next(name for name, module in model.llm.named_modules() if module is model.llm.get_output_embeddings())
    own = model.state_dict()
    # non-persistent buffers (position ids, rotary frequencies): older transformers saved them, the model computes them
    derived = {name.rsplit(".", 1)[-1] for name, _ in model.named_buffers() if name not in own}
    pruned = _pruned_tower_keys(model)
    nested = any(key.startswith(f"vision.model.{CLIP_INNER}") for key in own)
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.startswith(LLAVA_PROJECTOR):
            new = _projector_prefix(model.projector, source) + key.removeprefix(LLAVA_PROJECTOR)
        elif key.startswith(LLAVA_TOWER):
            new = _tower_prefix(model, source) + _tower_key(key.removeprefix(LLAVA_TOWER), nested)
            if pruned is not None and pruned.match(new):
                continue
        elif key == LLAVA_NEWLINE and KIT_NEWLINE in own:  # anyres with unpad: the projector's ImageNewline
            new = KIT_NEWLINE
        elif key.startswith("model.") and not key.startswith(("model.vision_tower.", LLAVA_NEWLINE)):
            new = llm_base + key.removeprefix("model.")
        elif key.startswith(LLAVA_HEAD):
            new = f"llm.{head}." + key.removeprefix(LLAVA_HEAD)
        else:
            new = key
        if new not in own and new.rsplit(".", 1)[-1] in derived:
            continue
        mapped[new] = tensor
    return _vocab_rows(model, own, mapped)
