"""Files shipped inside the package: the embedded digits teacher (see its README.md)."""

from __future__ import annotations

from pathlib import Path

DIGITS_TEACHER = Path(__file__).parent / "digits-teacher"


def digits_teacher_path() -> Path:
    """The model folder of the embedded class-conditional digits teacher."""
    if not (DIGITS_TEACHER / "model.safetensors").exists():
        raise FileNotFoundError(
            f"the embedded digits teacher is missing from {DIGITS_TEACHER}: reinstall leandit, or rebuild it with "
            "'leandit train --recipe recipes/digits-teacher.json --out runs/digits-teacher' and copy runs/digits-teacher/model there"
        )
    return DIGITS_TEACHER
