"""The one way to load and save models.

`load_model(path)` reads:
- a leandit model folder (`config.json`, `model.safetensors`, optional `ema.safetensors`
  and `compression.json`);
- a diffusers transformer folder (`config.json` + `diffusion_pytorch_model.safetensors` as
  `save_pretrained` writes them, optionally leandit's `leandit.json`, `ema.safetensors` and
  `compression.json` beside them), or a diffusers pipeline folder (its `transformer/`);
- an original DiT or SiT release file (`DiT-XL-2-256x256.pt`, `SiT-XL-2-256x256.pt`): a plain
  state dict, or a training checkpoint dict with `model`/`ema` entries (EMA preferred);
- an original MAR release file (`checkpoint-last.pth` of MAR-B/L/H): `model` and `model_ema`
  entries (EMA preferred), the architecture inferred from the tensors and the file's `args`
  (`leandit.models.infer_mar`);
- a single `.safetensors` file holding a state dict with the original key names;
- the name of a model shipped with leandit (`digits-teacher`).

A folder's metadata names its `model_type`, and the backbone adapter registered for that type
(`leandit.backbones.ADAPTERS_BY_TYPE`) reads and writes it. Loading is strict: a missing,
unexpected or mis-shaped key is an error naming it. `save_model` writes a model folder
atomically (a temporary folder, then a rename).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..assets import shipped_model
from ..files import write_folder_atomically
from ..backbones import ADAPTERS_BY_TYPE, LAYOUTS, backbone, find_adapter
from ..backbones.diffusers import DIFFUSERS_WEIGHTS, LEANDIT_META
from ..backbones.mar import mar_from_state_dict
from .config import NAMED_CONFIGS, DiTConfig, named_config
from .dit import DiT
from .mar import MAR
from .mar_config import MAR_SIZES, MARConfig, named_mar_config
from .infer import CheckpointError, check_keys, infer_dit_config
from .infer_mar import infer_mar_config, is_mar_state_dict
from .wrappers import apply_wrappers, peel_wrappers, write_wrappers

FORMAT = "leandit-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
COMPRESSION_FILE = "compression.json"


def build_model(name: str | DiTConfig | MARConfig, **overrides: Any) -> nn.Module:
    """A model with fresh random weights: a named size ("DiT-XL/2", "SiT-S/4", "MAR-L", ...),
    a named size with overrides in its name ("DiT-XL/2:depth=14,num_classes=10") or a config,
    with fields overridden (`build_model("DiT-XL/2", depth=14)`)."""
    if isinstance(name, DiTConfig):
        return DiT(name.replace(**overrides))
    if isinstance(name, MARConfig):
        return MAR(name.replace(**overrides))
    base, named_overrides = parse_named_size(name)
    if base in MAR_SIZES:
        return MAR(named_mar_config(base, **{**named_overrides, **overrides}))
    return DiT(named_config(base, **{**named_overrides, **overrides}))


def parse_named_size(spec: str) -> tuple[str, dict[str, Any]]:
    """("DiT-XL/2", {"depth": 14}) for "DiT-XL/2:depth=14"; (spec, {}) for anything else."""
    name, _, rest = str(spec).partition(":")
    if name not in NAMED_CONFIGS and name not in MAR_SIZES:
        return str(spec), {}
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        field, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"{spec!r}: overrides are FIELD=VALUE, e.g. {name}:depth=14")
        try:
            overrides[field.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[field.strip()] = value
    return name, overrides


def is_named_size(spec: str) -> bool:
    name = parse_named_size(spec)[0]
    return name in NAMED_CONFIGS or name in MAR_SIZES


def load_model(
    path: str | os.PathLike,
    *,
    weights: str = "auto",
    num_heads: int | None = None,
    objective: str | None = None,
    space: str | None = None,
    trust_checkpoint: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Load a model folder (leandit or diffusers), a shipped model's name, or an original
    DiT/SiT checkpoint file.

    Args:
        weights: "auto" (EMA weights when the file or folder has them), "ema" or "model".
        num_heads: head count for a checkpoint whose hidden size is not a standard one
            (for a MAR file: of its encoder and decoder).
        objective: "diffusion" or "flow" for DiT/SiT checkpoint files; default: "flow" when
            the file name contains "SiT", else "diffusion". Ignored for model folders; a
            MAR file is always "masked".
        space: "latent" or "pixel" for checkpoint files (default: latent for 4 channels, and
            for MAR files).
        trust_checkpoint: allow a checkpoint that pickles arbitrary Python objects (runs
            code from the file: only for files you trust).
    """
    name = str(path)
    path = shipped_model(name) or Path(path)
    if weights not in ("auto", "ema", "model"):
        raise ValueError(f"weights must be 'auto', 'ema' or 'model', got {weights!r}")
    if not path.exists():
        if is_named_size(name):  # "DiT-XL/2" names an architecture, not weights
            raise ValueError(
                f"{name!r} is a named size with no weights: leandit.build_model({name!r}) gives it random weights; "
                "to load weights pass a checkpoint file or a model folder"
            )
        raise FileNotFoundError(
            f"model not found: {path} (pass a model folder, a diffusers transformer or pipeline folder, a DiT/SiT .pt "
            "file, a MAR checkpoint-last.pth or a shipped model's name such as digits-teacher)"
        )
    if path.is_dir():
        model = _load_folder(path, weights)
    else:
        state_dict, label, args = read_checkpoint(path, weights=weights, trust=trust_checkpoint)
        if is_mar_state_dict(state_dict):
            model = _load_mar_file(path, state_dict, label, args, num_heads=num_heads, objective=objective, space=space)
            model.source = name
            return _placed(model, device, dtype)
        # "SiT-XL-2-256x256.pt" is a SiT; "DiT-XL-2-transition.pt" is not.
        guessed = "flow" if re.search(r"(?<![a-z])sit(?![a-z])", path.stem.lower()) else "diffusion"
        config = infer_dit_config(
            state_dict, num_heads=num_heads, objective=objective or guessed, space=space, name=path.stem
        )
        if config.in_channels == 4:
            # The original DiT/SiT samplers guide 3 of the 4 latent channels; their published
            # FIDs were measured so. A leandit folder records its own choice instead.
            config = config.replace(guided_channels=3)
        model = model_from_state_dict(config, state_dict, source=f"{path} ({label})")
    model.source = name
    return _placed(model, device, dtype)


def _placed(model: nn.Module, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    model = model.to(device)
    if any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
        model = model.to(dtype)  # diffusers warns on a dtype argument even when nothing changes
    return model


def _load_mar_file(
    path: Path,
    state_dict: dict[str, torch.Tensor],
    label: str,
    args: Any,
    *,
    num_heads: int | None,
    objective: str | None,
    space: str | None,
) -> MAR:
    """A MAR release file (`checkpoint-last.pth`): the config from its tensors and `args`."""
    if objective not in (None, "masked"):
        raise CheckpointError(
            f"{path}: is a MAR checkpoint (a masked model with a diffusion head): --objective {objective} applies to "
            "DiT/SiT files only; drop it"
        )
    config = infer_mar_config(state_dict, args=args, num_heads=num_heads, space=space, name=path.stem)
    return mar_from_state_dict(config, state_dict, source=f"{path} ({label})")


def model_from_state_dict(
    config: DiTConfig, state_dict: Mapping[str, torch.Tensor], source: str = "state dict"
) -> DiT:
    """Build the network on the meta device (no memory, no init work) and adopt the tensors.

    The model SHARES the given tensors (no copy, which matters for a 2.7 GB checkpoint):
    clone the state dict first if the source must stay untouched while the model trains.
    """
    with torch.device("meta"):
        model = DiT(config)
    check_keys(model.state_dict(), state_dict, source)
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    return model


def read_checkpoint_file(
    path: Path, *, weights: str = "auto", trust: bool = False
) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in a .pt/.pth/.safetensors file, and which entry it came from."""
    state_dict, label, _ = read_checkpoint(path, weights=weights, trust=trust)
    return state_dict, label


# The entries of a training checkpoint that hold EMA weights: DiT/SiT's train.py writes
# "ema", MAR's main_mar.py "model_ema" (a full state dict beside "model").
_EMA_ENTRIES = ("ema", "model_ema")


def read_checkpoint(
    path: Path, *, weights: str = "auto", trust: bool = False
) -> tuple[dict[str, torch.Tensor], str, Any]:
    """(state dict, the entry it came from, the training `args` or None) of a checkpoint file.

    A training checkpoint ({"model", "ema" or "model_ema", "opt"/"optimizer", "args", ...})
    gives its EMA weights under weights="auto"/"ema" and "model" under weights="model"; the
    other entries (optimizer state, epoch, loss scaler) are read, never used.
    """
    if path.suffix == ".safetensors":
        if weights == "ema":
            raise CheckpointError(f"{path}: a single safetensors state dict has no separate 'ema' entry; use --weights auto (weights='auto' in Python)")
        try:
            return _strip_wrapper_prefix(load_file(str(path))), "safetensors", None
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(err)}); is it complete?") from None
    obj = _torch_load(path, trust)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    args = None
    if "model" in obj or any(e in obj for e in _EMA_ENTRIES):
        # A training checkpoint; EMA weights are the ones to use. MAR's writes model_ema=None
        # when it trained without EMA: that entry is absent for our purposes.
        ema = next((e for e in _EMA_ENTRIES if obj.get(e) is not None), None)
        if weights == "model":
            entry = "model"
        elif weights == "ema" and ema is None:
            raise CheckpointError(
                f"{path}: has no EMA weights (no 'ema' or 'model_ema' entry; it has {sorted(map(str, obj))}); "
                "use --weights model or --weights auto (weights=... in Python)"
            )
        else:
            entry = ema or "model"
        if obj.get(entry) is None:
            raise CheckpointError(f"{path}: has no {entry!r} entry (it has {sorted(map(str, obj))})")
        args = obj.get("args")
        obj, label = obj[entry], entry
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: its {entry!r} entry is a {type(obj).__name__}, not a state dict")
    else:
        if weights == "ema":
            raise CheckpointError(f"{path}: is a plain state dict with no separate 'ema' entry; use --weights auto (weights='auto' in Python)")
        label = "state dict"
    odd = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise CheckpointError(f"{path}: entries that are not tensors: {odd[:5]}")
    return _strip_wrapper_prefix(dict(obj)), label, args


def _torch_load(path: Path, trust: bool) -> Any:
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        # DiT/SiT training checkpoints pickle an argparse.Namespace in "args": harmless data,
        # but torch >= 2.6 refuses it unless allow-listed.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        # torch mentions "weights_only" in every refusal; only this line means "a class I
        # was not allowed to load", i.e. a readable file that needs trust.
        unsupported = [line for line in _plain(err).splitlines() if "Unsupported global" in line]
        if unsupported:
            raise CheckpointError(
                f"{path}: pickles Python objects other than tensors ({unsupported[0].strip()[:160]}); "
                "if you trust the file, load it with trust_checkpoint=True (--trust-checkpoint)"
            ) from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {_damage(path, err)}") from None
    except Exception as err:  # torch's unpickler raises many types on a file that is not a checkpoint
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {_damage(path, err)}") from None


def _damage(path: Path, err: BaseException) -> str:
    """What is wrong with a file torch cannot read, in words (torch's own message is often a
    bare number such as "101" or "pop from empty list")."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes); copy it again"
    with open(path, "rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(path) and not head.startswith(b"PK") and head[:1] != b"\x80":
        return "the file is not a checkpoint (it is neither torch.save's zip format nor a pickle); check the file name"
    detail = _first_line(err).split(". ")[0]
    return f"the file is damaged or incomplete ({size:,} bytes; torch: {detail}); is the copy or download complete?"


def _plain(err: BaseException) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", str(err))


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in _plain(err).splitlines() if line.strip()]
    return (lines[0][:160] if lines else type(err).__name__)


def _strip_wrapper_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoints saved from a DDP or torch.compile wrapper prefix every key the same way."""
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _load_folder(folder: Path, weights: str) -> nn.Module:
    model_folder, meta = identify_folder(folder)
    adapter = ADAPTERS_BY_TYPE[meta["model_type"]]
    weights_name, ema_name = adapter.weights_files(model_folder)
    has_ema = (model_folder / ema_name).exists()
    if weights == "ema" and not has_ema:
        raise CheckpointError(f"{model_folder}: has no {ema_name}; use --weights model or --weights auto (weights=... in Python)")
    use_ema = weights == "ema" or (weights == "auto" and has_ema)
    wrapped = bool(meta.get("wrappers"))
    # A wrapped model's EMA covers the wrappers too: build it from the model weights, then
    # load the whole EMA state dict on top.
    file = model_folder / (ema_name if use_ema and not wrapped else weights_name)
    if not file.exists():
        found = sorted(p.name for p in model_folder.iterdir())
        raise CheckpointError(f"{model_folder}: {file.name} is missing (the folder holds {found}); is the copy complete?")
    model = adapter.read_files(model_folder, meta, file)
    if wrapped:
        model = apply_wrappers(model, meta["wrappers"], model_folder)
        if use_ema:
            ema = read_safetensors(model_folder / ema_name)
            check_keys(model.state_dict(), ema, str(model_folder / ema_name))
            model.load_state_dict(ema, strict=True)
    model.compression = read_compression(model_folder)
    backbone(peel_wrappers(model)[0]).prepare()
    return model


def identify_folder(folder: Path) -> tuple[Path, dict[str, Any]]:
    """(the folder holding the model, leandit's metadata of it) for a leandit model folder, a
    diffusers transformer folder or a diffusers pipeline folder (its transformer/)."""
    folder = Path(folder)
    if (folder / "model_index.json").exists():
        if not (folder / "transformer").is_dir():
            raise CheckpointError(
                f"{folder}: a diffusers pipeline without a transformer/ folder: pass a pipeline that has one "
                "(DiT, PixArt), or the transformer folder itself"
            )
        folder = folder / "transformer"
    config_path = folder / CONFIG_FILE
    if not config_path.exists():
        raise CheckpointError(
            f"{folder}: no {CONFIG_FILE}: not a model folder (pass a leandit model folder, a diffusers transformer "
            "folder or a pipeline folder)"
        )
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: not a model config (a JSON object)")
    if config.get("format") == FORMAT:
        meta = config
    elif "_class_name" in config:
        class_name = config["_class_name"]
        if class_name not in LAYOUTS:
            raise CheckpointError(
                f"{folder}: holds a diffusers {class_name}, not a transformer leandit can adapt "
                f"(supported: {', '.join(LAYOUTS)})"
            )
        meta_path = folder / LEANDIT_META
        meta = _read_json(meta_path) if meta_path.exists() else {"format": FORMAT, "format_version": 1, "model_type": "diffusers"}
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{meta_path}: not leandit's metadata (format {meta.get('format')!r})")
        meta = {**meta, "class_name": class_name}
    else:
        raise CheckpointError(f"{config_path}: not a leandit model config (format {config.get('format')!r}) nor a diffusers one")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path}: format version {meta['format_version']} is newer than this leandit "
            f"reads ({FORMAT_VERSION}); upgrade leandit"
        )
    if meta.get("model_type") not in ADAPTERS_BY_TYPE:
        raise CheckpointError(
            f"{config_path}: unknown model_type {meta.get('model_type')!r} (this leandit reads {', '.join(ADAPTERS_BY_TYPE)}); "
            "upgrade leandit or check the file"
        )
    return folder, meta


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(err)}); is it complete?") from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file, the index of a sharded one, or a .bin file."""
    path = Path(path)
    if path.name.endswith(".safetensors.index.json"):
        index = _read_json(path)
        shards = sorted(set(index.get("weight_map", {}).values()))
        state_dict: dict[str, torch.Tensor] = {}
        for shard in shards:
            state_dict.update(read_safetensors(path.parent / shard))
        return state_dict
    if path.suffix == ".bin":
        return _torch_load(path, trust=False)
    return read_safetensors(path)


def weights_file(folder: Path, ema: bool = False) -> Path:
    """The weights file of a model folder or training checkpoint (leandit's or diffusers' name)."""
    folder = Path(folder)
    if ema:
        return folder / EMA_FILE
    for name in (WEIGHTS_FILE, DIFFUSERS_WEIGHTS, DIFFUSERS_WEIGHTS + ".index.json", "diffusion_pytorch_model.bin"):
        if (folder / name).exists():
            return folder / name
    return folder / WEIGHTS_FILE


def read_compression(folder: Path) -> list[dict[str, Any]]:
    """The compression history of a model folder: one record per step, oldest first."""
    path = Path(folder) / COMPRESSION_FILE
    if not path.exists():
        return []
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    return records if isinstance(records, list) else [records]


def save_model(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    ema: nn.Module | Mapping[str, torch.Tensor] | None = None,
    compression: list[dict[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model folder atomically; an existing folder is replaced only once the new one
    is complete, and only when it is a model folder leandit wrote (or empty): a folder that
    holds other files, or a file of that name, is refused unless `overwrite=True`.

    The folder's layout follows the model: a leandit DiT writes config.json (leandit's) +
    model.safetensors; a diffusers transformer writes what `save_pretrained` writes (so stock
    `from_pretrained` reads it) plus leandit.json. Registered wrappers (see
    `leandit.models.wrappers`) add their weights and tables beside the backbone's.

    Args:
        ema: EMA weights to store beside the model's own (loaded by default).
        compression: the compression history to record; default: `model.compression`.
        extra: JSON-serialisable facts to store in the metadata under "info".
        overwrite: replace whatever `folder` is (its files are deleted).
    """
    folder = Path(folder)
    if not overwrite:
        check_replaceable(folder)
    if find_adapter(peel_wrappers(model)[0]) is None:
        raise ValueError(f"cannot save a {type(model).__name__} as a model folder: it is not a backbone leandit can adapt")
    records = compression if compression is not None else getattr(model, "compression", None) or []
    write_folder_atomically(
        folder, lambda tmp: write_model_files(tmp, model, ema=ema, compression=records, extra=extra)
    )
    return Path(folder)


# The files a model folder of leandit's holds (wrapper weights are *.safetensors too).
_MODEL_FILE_NAMES = {CONFIG_FILE, COMPRESSION_FILE, LEANDIT_META}
_MODEL_FILE_ENDINGS = (".safetensors", ".safetensors.index.json", ".bin")


def check_replaceable(folder: Path) -> None:
    """Refuse to replace `folder` unless it is absent, empty, or a model folder (leandit's or a
    diffusers transformer's) holding only model files: a user's other files are never deleted."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    how = "pass another folder, or overwrite=True (--overwrite) to replace it"
    if not folder.is_dir() or folder.is_symlink():
        raise FileExistsError(f"{folder} exists and is not a folder; {how}")
    entries = sorted(folder.iterdir())
    if not entries:
        return
    try:
        model_folder, _ = identify_folder(folder)
    except CheckpointError:
        model_folder = None
    if model_folder != folder:
        shown = ", ".join(p.name for p in entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise FileExistsError(f"{folder} is not a model folder (it holds {shown}); {how}")
    foreign = [p.name for p in entries if not p.is_file() or not (p.name in _MODEL_FILE_NAMES or p.name.endswith(_MODEL_FILE_ENDINGS))]
    if foreign:
        raise FileExistsError(f"{folder} holds files that are not the model's ({', '.join(foreign[:5])}); {how}")


def write_model_files(
    folder: Path,
    model: nn.Module,
    *,
    ema: nn.Module | Mapping[str, torch.Tensor] | None = None,
    compression: list[dict[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write a model's files into an existing folder.

    Any module's weights can be written (a training checkpoint of a gated model); only a
    backbone, possibly inside registered wrappers, makes a loadable model folder.
    """
    inner, wrappers = peel_wrappers(model)
    adapter = find_adapter(inner)
    if adapter is None:
        save_tensors(model.state_dict(), folder / WEIGHTS_FILE)
    else:
        meta: dict[str, Any] = {}
        if extra:
            meta["info"] = dict(extra)
        if wrappers:
            # The tables describe the weights load_model gives by default: the EMA's when there is one.
            ema_layers = peel_wrappers(ema)[1] if isinstance(ema, nn.Module) else None
            if ema_layers is not None and [w for w, _ in ema_layers] != [w for w, _ in wrappers]:
                ema_layers = None
            meta["wrappers"] = write_wrappers(folder, wrappers, ema_layers)
        adapter(inner).write_files(folder, meta)
    if ema is not None:
        ema_sd = ema.state_dict() if isinstance(ema, nn.Module) else ema
        check_keys(model.state_dict(), ema_sd, "EMA weights")
        save_tensors(ema_sd, folder / EMA_FILE)
    if compression:
        (folder / COMPRESSION_FILE).write_text(json.dumps(compression, indent=2) + "\n")


def save_tensors(state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    save_file(_tensors(state_dict), str(path))


def _tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
