"""Models shipped inside the package, by name: the embedded digits teacher (see its README.md).

Every command and `leandit.load_model` accept these names where they accept a model folder,
so a user who installed leandit (and has no checkout path to point at) can still name them.
"""

from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).parent
DIGITS_TEACHER = ASSETS / "digits-teacher"
SHIPPED_MODELS: dict[str, Path] = {"digits-teacher": DIGITS_TEACHER}


def digits_teacher_path() -> Path:
    """The model folder of the embedded class-conditional digits teacher."""
    if not (DIGITS_TEACHER / "model.safetensors").exists():
        raise FileNotFoundError(
            f"the embedded digits teacher is missing from {DIGITS_TEACHER}: reinstall leandit, or rebuild it with "
            "'leandit train --recipe recipes/digits-teacher.json --out runs/digits-teacher' and copy runs/digits-teacher/model there"
        )
    return DIGITS_TEACHER


def shipped_model(spec: str | os.PathLike) -> Path | None:
    """The folder of a shipped model named `spec`, or None. A file or folder of that name in
    the current directory wins: a user's own `digits-teacher/` is never shadowed."""
    name = str(spec)
    if name not in SHIPPED_MODELS or Path(name).exists():
        return None
    return digits_teacher_path() if name == "digits-teacher" else SHIPPED_MODELS[name]
