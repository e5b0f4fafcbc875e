"""The end-to-end story on the embedded digits teacher, as stages that are reused when rerun.

Today's stages: describe the teacher, sample it, check the samples with a digits classifier,
write `report.md`. Compression and recovery stages join as they land.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .assets import digits_teacher_path
from .commands.info import describe
from .data.digits import to_digits_range
from .evaluate.digits import class_agreement, held_out_accuracy
from .evaluate.sampling import generate, make_labels, save_grid, save_npz, to_uint8_images
from .models import load_model

# Sampling settings of the demo (chosen by measurement: see the teacher's README.md).
SAMPLES_PER_CLASS = 100
SAMPLER = "ddim"
STEPS = 50
CFG_SCALE = 1.0


@dataclass
class Stages:
    """Run named stages once; a stage's result is kept in `state.json` and reused on a
    rerun unless its settings changed or `redo` names it (or "all")."""

    folder: Path
    redo: set[str] = field(default_factory=set)
    log: Callable[[str], None] = print

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "state.json"
        self.state = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, name: str, settings: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        cached = self.state.get(name)
        if cached and cached["settings"] == settings and not ({name, "all"} & self.redo):
            self.log(f"[{name}] reusing the result from {cached['finished']} (pass --redo {name} to run it again)")
            return cached["result"]
        self.log(f"[{name}] running ...")
        started = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - started
        self.state[name] = {
            "settings": settings,
            "result": result,
            "seconds": round(seconds, 2),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        tmp.replace(self.path)
        self.log(f"[{name}] done in {seconds:.1f} s")
        return result


def run_demo(out: Path, *, redo: set[str] = frozenset(), device: str = "cpu", progress: bool = True, log=print) -> Path:
    """Run (or reuse) every stage and write `out/report.md`; returns its path."""
    started = time.perf_counter()
    stages = Stages(Path(out), set(redo), log)
    teacher_dir = digits_teacher_path()
    teacher = load_model(teacher_dir, device=device)

    # Settings name the teacher's weights by hash, so a rebuilt teacher reruns every stage.
    teacher_id = _file_hash(teacher_dir / "model.safetensors")
    info = stages.run("teacher", {"model": teacher_id}, lambda: describe(teacher))

    sample_settings = {"model": teacher_id, "per_class": SAMPLES_PER_CLASS, "sampler": SAMPLER, "steps": STEPS, "cfg_scale": CFG_SCALE, "seed": 0}

    def sample_teacher() -> dict[str, Any]:
        labels = make_labels(SAMPLES_PER_CLASS * teacher.config.num_classes, teacher.config.num_classes)
        x = generate(teacher, labels, sampler=SAMPLER, steps=STEPS, cfg_scale=CFG_SCALE, seed=0, batch_size=250, progress=progress)
        images = to_uint8_images(x, teacher.config.space)
        save_npz(stages.folder / "teacher_samples.npz", images, labels.numpy())
        # The grid shows the first 10 samples of every class, one class per column.
        save_grid(stages.folder / "teacher_grid.png", images[: 10 * teacher.config.num_classes], ncols=teacher.config.num_classes)
        agreement = class_agreement(to_digits_range(x), labels.numpy())
        return {"samples": len(labels), "class_agreement": agreement, "grid": "teacher_grid.png", "npz": "teacher_samples.npz"}

    samples = stages.run("sample-teacher", sample_settings, sample_teacher)
    classifier = stages.run("classifier", {"recipe": "SVC(gamma=0.001, C=10)"}, lambda: {"held_out_accuracy": held_out_accuracy()})

    report = stages.folder / "report.md"
    report.write_text(_report(info, samples, classifier, time.perf_counter() - started))
    return report


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _report(info: dict, samples: dict, classifier: dict, seconds: float) -> str:
    c = info["architecture"]
    return f"""# leandit demo report

The embedded digits teacher: a class-conditional DiT trained by `leandit train` on
scikit-learn's 8x8 digits (pixel space, patch 2 = {info['tokens']} tokens).

| model | blocks | hidden | params | GFLOPs / forward | class agreement of samples |
|---|---|---|---|---|---|
| teacher | {c['depth']} | {c['hidden_size']} | {info['parameters'] / 1e6:.2f} M | {info['flops_per_forward'] / 1e9:.4f} | {samples['class_agreement']:.1%} |

Class agreement: the share of {samples['samples']} class-conditional samples ({SAMPLER}, {STEPS} steps,
guidance scale {CFG_SCALE:g}) that an SVC trained on the real digits assigns to the class they
were generated for. The same SVC recipe scores {classifier['held_out_accuracy']:.1%} on held-out
real digits.

![teacher samples: one class per column]({samples['grid']})

Compression and recovery (TinyFusion depth pruning, knowledge distillation) and the
digits-FID join this report as those features land.

Demo time (this run, stages reused from earlier runs count as 0): {seconds:.0f} s.
"""
