"""Models shipped inside the package, by name: the embedded digits teachers (see each folder's
README.md): "digits-teacher" (a DiT) and "digits-mar-teacher" (a MAR).

Every command and `leandit.load_model` accept these names where they accept a model folder,
so a user who installed leandit (and has no checkout path to point at) can still name them.
"""

from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).parent
DIGITS_TEACHER = ASSETS / "digits-teacher"
DIGITS_MAR_TEACHER = ASSETS / "digits-mar-teacher"
SHIPPED_MODELS: dict[str, Path] = {"digits-teacher": DIGITS_TEACHER, "digits-mar-teacher": DIGITS_MAR_TEACHER}
# The recipe each shipped model is rebuilt from (in a checkout: recipes/<name>.json).
_RECIPES = {"digits-teacher": "recipes/digits-teacher.json", "digits-mar-teacher": "recipes/digits-mar-teacher.json"}


def _shipped_path(name: str) -> Path:
    folder = SHIPPED_MODELS[name]
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(
            f"the embedded {name} is missing from {folder}: reinstall leandit, or rebuild it with "
            f"'leandit train --recipe {_RECIPES[name]} --out runs/{name}' and copy runs/{name}/model there"
        )
    return folder


def digits_teacher_path() -> Path:
    """The model folder of the embedded class-conditional digits teacher (a DiT)."""
    return _shipped_path("digits-teacher")


def digits_mar_teacher_path() -> Path:
    """The model folder of the embedded class-conditional digits MAR teacher."""
    return _shipped_path("digits-mar-teacher")


def shipped_model(spec: str | os.PathLike) -> Path | None:
    """The folder of a shipped model named `spec`, or None. A file or folder of that name in
    the current directory wins: a user's own `digits-teacher/` is never shadowed."""
    name = str(spec)
    if name not in SHIPPED_MODELS or Path(name).exists():
        return None
    return _shipped_path(name)
