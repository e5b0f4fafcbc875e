"""Sampling at scale: N images (50,000 is the standard) in parts, split across torchrun ranks
with no duplicates or gaps, resumable, assembled into one ADM-layout .npz without holding the
images in memory twice.

Global image i has the noise of seed (seed, i) and the i-th label of the run, so the images
do not depend on the number of processes, the batch size or interruptions. Part p holds
images [p * S, (p + 1) * S); rank r makes the parts p = r, r + W, r + 2W, ... and writes each
atomically to <out>/parts/; a rerun skips parts already written. Rank 0 then streams the parts
in order into <out>/samples.npz (arr_0 = N x H x W x C uint8, arr_1 = labels).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..files import savez_atomically, write_atomically, write_text_atomically

PARTS = "parts"
SETTINGS = "sampling.json"


@dataclass(frozen=True)
class PartPlan:
    """Which images make which part, and which parts belong to which rank."""

    num: int
    part_size: int

    def __post_init__(self) -> None:
        if self.num < 1 or self.part_size < 1:
            raise ValueError(f"the number of samples and the part size must be at least 1, got {self.num} and {self.part_size}")

    @property
    def num_parts(self) -> int:
        return -(-self.num // self.part_size)

    def indices(self, part: int) -> range:
        return range(part * self.part_size, min((part + 1) * self.part_size, self.num))

    def parts_of(self, rank: int, world_size: int) -> list[int]:
        return list(range(rank, self.num_parts, world_size))

    def path(self, out: Path, part: int) -> Path:
        r = self.indices(part)
        return Path(out) / PARTS / f"part-{r.start:07d}-{r.stop:07d}.npz"


# The options of `leandit sample` behind the settings' fields (the rest are --field-name).
OPTION_NAMES = {
    "num": "--num-samples", "model": "MODEL", "model_files": "the model's weight files (changed since)",
    "prompts_files": "the --prompts file (changed since)",
}


def check_settings(out: Path, settings: dict) -> None:
    """Refuse to continue a folder whose parts were made with other settings (reads only: the
    settings are written with the first part, see `write_settings`)."""
    path = Path(out) / SETTINGS
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ValueError(f"{path} is not valid JSON: remove it (and {Path(out) / PARTS}) or use a new --out") from None
    changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if changed:
        what = "; ".join(
            f"{OPTION_NAMES.get(k, '--' + k.replace('_', '-'))}" + ("" if k.endswith("_files") else f" was {saved.get(k)!r}, now {settings.get(k)!r}")
            for k in changed
        )
        raise ValueError(f"{out} holds samples made with other settings ({what}); use the same options or a new --out")


def write_settings(out: Path, settings: dict) -> None:
    """Record the settings the parts are made with (once, before the first part is written)."""
    path = Path(out) / SETTINGS
    if not path.exists():
        write_text_atomically(path, json.dumps(settings, indent=2) + "\n")


def read_part(path: Path, expected: range) -> tuple[np.ndarray, np.ndarray] | None:
    """(images, labels) of a complete part with exactly the expected indices, else None."""
    try:
        with np.load(path) as data:
            indices, images, labels = data["indices"], data["images"], data["labels"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    if not np.array_equal(indices, np.arange(expected.start, expected.stop)):
        return None
    return images, labels


def write_part(path: Path, indices: range, images: np.ndarray, labels: np.ndarray) -> None:
    savez_atomically(path, indices=np.arange(indices.start, indices.stop), images=images, labels=labels)


def make_parts(
    plan: PartPlan,
    out: Path,
    rank: int,
    world_size: int,
    render: Callable[[range], np.ndarray],
    labels: np.ndarray,
    progress: Callable[[int, int], None] | None = None,
    before_write: Callable[[], None] | None = None,
) -> int:
    """Render this rank's missing parts; returns how many were made (the rest were reused).
    `before_write` runs once, before the first part is written (to record the settings)."""
    mine = plan.parts_of(rank, world_size)
    made = 0
    for n, part in enumerate(mine):
        indices = plan.indices(part)
        path = plan.path(out, part)
        if read_part(path, indices) is None:
            images = render(indices)
            if before_write is not None and made == 0:
                before_write()
            write_part(path, indices, images, labels[indices.start : indices.stop])
            made += 1
        if progress:
            progress(n + 1, len(mine))
    return made


def assemble(plan: PartPlan, out: Path, name: str = "samples.npz") -> Path:
    """Stream every part, in order, into one ADM-layout .npz (written atomically)."""
    first = read_part(plan.path(out, 0), plan.indices(0))
    if first is None:
        raise ValueError(f"{plan.path(out, 0)} is missing: rerun the same command to make it")
    shape, dtype = (plan.num, *first[0].shape[1:]), first[0].dtype
    target = Path(out) / name

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array_header_2_0(entry, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
                labels = []
                for part in range(plan.num_parts):
                    data = first if part == 0 else read_part(plan.path(out, part), plan.indices(part))
                    if data is None:
                        raise ValueError(f"{plan.path(out, part)} is missing or incomplete: rerun the same command to make it")
                    entry.write(np.ascontiguousarray(data[0]).tobytes())
                    labels.append(data[1])
            with archive.open("arr_1.npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, np.concatenate(labels).astype(np.int64))

    write_atomically(target, write)
    return target



def first_images(plan: PartPlan, out: Path, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` images and labels (for a grid), read from the parts."""
    images, labels = [], []
    for part in range(plan.num_parts):
        data = read_part(plan.path(out, part), plan.indices(part))
        images.append(data[0])
        labels.append(data[1])
        if sum(len(x) for x in images) >= count:
            break
    return np.concatenate(images)[:count], np.concatenate(labels)[:count]


__all__ = ["PartPlan", "assemble", "check_settings", "first_images", "make_parts", "read_part", "write_part", "write_settings"]
