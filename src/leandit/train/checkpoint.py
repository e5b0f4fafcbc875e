"""Training checkpoints: a folder per saved step under `<run>/checkpoints/`.

`step-0001000/` holds the trained module's weights (`model.safetensors`), its EMA
(`ema.safetensors`) and `training_state.pt` (step, optimizer, per-process RNG states, skip
count, the job's own state). When the trained module is a backbone the folder is also a
model folder (with `config.json`), so `leandit sample <run>/checkpoints/step-0001000` works.
`latest` names the newest complete checkpoint; it is written after the folder is complete.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..models.infer import CheckpointError, check_keys
from ..files import write_folder_atomically, write_text_atomically
from ..models.io import EMA_FILE, weights_file, write_model_files
from ..models.wrappers import peel_wrappers

STATE_FILE = "training_state.pt"
LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: Path, step: int, module: nn.Module, ema: nn.Module | None, state: dict[str, Any], keep: int = 2
) -> Path:
    """Write step-N atomically, point `latest` at it, and keep only the newest `keep`."""
    root = checkpoint_dir(run_dir)
    folder = root / f"step-{step:07d}"

    def write(tmp: Path) -> None:
        write_model_files(tmp, module, ema=ema)
        torch.save(state, tmp / STATE_FILE)

    write_folder_atomically(folder, write)
    write_text_atomically(root / LATEST_FILE, folder.name + "\n")
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = checkpoint_dir(run_dir)
    pointer = root / LATEST_FILE
    if pointer.exists():
        folder = root / pointer.read_text().strip()
        if (folder / STATE_FILE).exists():
            return folder
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(folder: Path, module: nn.Module, ema: nn.Module | None) -> dict[str, Any]:
    """Load weights into `module` (and `ema`) strictly; return the training state."""
    weights_path = weights_file(folder)  # model.safetensors, or diffusers' name for a diffusers backbone
    if peel_wrappers(module)[1]:
        # A wrapped backbone (a DyDiT model) keeps its wrappers' tensors in their own files:
        # the folder rebuilt as a model has exactly the module's state dict.
        from ..models.io import load_model

        weights = load_model(folder, weights="model").state_dict()
    else:
        weights = load_file(str(weights_path))
    check_keys(module.state_dict(), weights, str(weights_path))
    module.load_state_dict(weights, strict=True)
    if ema is not None:
        if not (folder / EMA_FILE).exists():
            raise CheckpointError(f"{folder}: no {EMA_FILE}, but this run keeps an EMA")
        ema_weights = load_file(str(folder / EMA_FILE))
        check_keys(ema.state_dict(), ema_weights, str(folder / EMA_FILE))
        ema.load_state_dict(ema_weights, strict=True)
    try:
        return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which and what to do
        raise CheckpointError(f"{folder / STATE_FILE}: unreadable ({err}); delete {folder} to resume from the one before") from None
