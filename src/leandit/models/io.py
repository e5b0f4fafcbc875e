"""The one way to load and save models.

`load_model(path)` reads:
- a leandit model folder (`config.json`, `model.safetensors`, optional `ema.safetensors`
  and `compression.json`);
- an original DiT or SiT release file (`DiT-XL-2-256x256.pt`, `SiT-XL-2-256x256.pt`): a plain
  state dict, or a training checkpoint dict with `model`/`ema` entries (EMA preferred);
- a single `.safetensors` file holding a state dict with the original key names.

Loading is strict: a missing, unexpected or mis-shaped key is an error naming it.
`save_model` writes a model folder atomically (a temporary folder, then a rename).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import DiTConfig, named_config
from .dit import DiT
from .infer import CheckpointError, check_keys, infer_dit_config

FORMAT = "leandit-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
COMPRESSION_FILE = "compression.json"
MODEL_TYPES = {"dit": DiT}


def build_model(name: str | DiTConfig, **overrides: Any) -> DiT:
    """A model with fresh random weights: a named size ("DiT-XL/2", "SiT-S/4", ...) or a
    config, with fields overridden (`build_model("DiT-XL/2", depth=14)`)."""
    config = name.replace(**overrides) if isinstance(name, DiTConfig) else named_config(name, **overrides)
    return DiT(config)


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
) -> DiT:
    """Load a model folder or an original DiT/SiT checkpoint file.

    Args:
        weights: "auto" (EMA weights when the file or folder has them), "ema" or "model".
        num_heads: head count for a checkpoint whose hidden size is not a standard one.
        objective: "diffusion" or "flow" for checkpoint files; default: "flow" when the
            file name contains "SiT", else "diffusion". Ignored for model folders.
        space: "latent" or "pixel" for checkpoint files (default: latent for 4 channels).
        trust_checkpoint: allow a checkpoint that pickles arbitrary Python objects (runs
            code from the file: only for files you trust).
    """
    path = Path(path)
    if weights not in ("auto", "ema", "model"):
        raise ValueError(f"weights must be 'auto', 'ema' or 'model', got {weights!r}")
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path} (pass a model folder, a named config or a DiT/SiT .pt file)")
    if path.is_dir():
        model = _load_folder(path, weights)
    else:
        state_dict, label = read_checkpoint_file(path, weights=weights, trust=trust_checkpoint)
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
    model.source = str(path)
    return model.to(device=device, dtype=dtype)


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
    if path.suffix == ".safetensors":
        if weights == "ema":
            raise CheckpointError(f"{path}: a single safetensors state dict has no separate 'ema' entry; use weights='auto'")
        try:
            return _strip_wrapper_prefix(load_file(str(path))), "safetensors"
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(err)}); is it complete?") from None
    obj = _torch_load(path, trust)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    if "model" in obj or "ema" in obj:
        # A training checkpoint: {"model", "ema", "opt", "args"}; EMA weights are the ones to use.
        entry = {"auto": "ema" if "ema" in obj else "model"}.get(weights, weights)
        if entry not in obj:
            raise CheckpointError(f"{path}: has no {entry!r} entry (it has {sorted(obj)})")
        obj, label = obj[entry], entry
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: its {entry!r} entry is a {type(obj).__name__}, not a state dict")
    else:
        if weights == "ema":
            raise CheckpointError(f"{path}: is a plain state dict with no separate 'ema' entry; use weights='auto'")
        label = "state dict"
    odd = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise CheckpointError(f"{path}: entries that are not tensors: {odd[:5]}")
    return _strip_wrapper_prefix(dict(obj)), label


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
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(err)}); is the file complete?") from None
    except Exception as err:  # torch's unpickler raises many types on a file that is not a checkpoint
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(err)}); is the file complete?") from None


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


def _load_folder(folder: Path, weights: str) -> DiT:
    config_path = folder / CONFIG_FILE
    if not config_path.exists():
        raise CheckpointError(f"{folder}: no {CONFIG_FILE}: not a leandit model folder")
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{config_path}: not a leandit model config (format {meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path}: format version {meta['format_version']} is newer than this leandit "
            f"reads ({FORMAT_VERSION}); upgrade leandit"
        )
    model_type = meta.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{config_path}: unknown model_type {model_type!r}")
    try:
        config = DiTConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{config_path}: bad config ({err})") from None
    has_ema = (folder / EMA_FILE).exists()
    if weights == "ema" and not has_ema:
        raise CheckpointError(f"{folder}: has no {EMA_FILE}; use weights='model' or 'auto'")
    file = folder / (EMA_FILE if weights == "ema" or (weights == "auto" and has_ema) else WEIGHTS_FILE)
    if not file.exists():
        raise CheckpointError(f"{folder}: {file.name} is missing")
    try:
        state_dict = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file}: not a readable safetensors file ({err}); is it complete?") from None
    model = model_from_state_dict(config, state_dict, source=str(file))
    model.compression = read_compression(folder)
    return model


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
    model: DiT,
    folder: str | os.PathLike,
    *,
    ema: DiT | Mapping[str, torch.Tensor] | None = None,
    compression: list[dict[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a model folder atomically; an existing folder is replaced only once the new one
    is complete.

    Args:
        ema: EMA weights to store beside the model's own (loaded by default).
        compression: the compression history to record; default: `model.compression`.
        extra: JSON-serialisable facts to store in config.json under "info".
    """
    records = compression if compression is not None else getattr(model, "compression", None) or []
    write_folder_atomically(
        Path(folder), lambda tmp: write_model_files(tmp, model, ema=ema, compression=records, extra=extra)
    )
    return Path(folder)


def write_model_files(
    folder: Path,
    model: torch.nn.Module,
    *,
    ema: torch.nn.Module | Mapping[str, torch.Tensor] | None = None,
    compression: list[dict[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write weights (and, for a backbone, config.json) into an existing folder.

    Any module's weights can be written; only a backbone's make a loadable model folder.
    """
    if isinstance(model, DiT):
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_type": "dit",
            "config": model.config.to_dict(),
        }
        if extra:
            meta["info"] = dict(extra)
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    save_file(_tensors(model.state_dict()), str(folder / WEIGHTS_FILE))
    if ema is not None:
        ema_sd = ema.state_dict() if isinstance(ema, torch.nn.Module) else ema
        check_keys(model.state_dict(), ema_sd, "EMA weights")
        save_file(_tensors(ema_sd), str(folder / EMA_FILE))
    if compression:
        (folder / COMPRESSION_FILE).write_text(json.dumps(compression, indent=2) + "\n")


def write_folder_atomically(folder: Path, write) -> None:
    """Call write(tmp) on a fresh temporary folder beside `folder`, then move it into place."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        write(tmp)
        _make_readable(tmp)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / folder.name)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it: done once, at import
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def _make_readable(folder: Path) -> None:
    """mkdtemp makes 0700 folders and safetensors 0600 files; give them the usual umask modes
    so others on shared storage can read a model."""
    os.chmod(folder, 0o777 & ~_UMASK)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_UMASK)


def _tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
