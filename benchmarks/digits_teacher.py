"""Do the embedded digits teacher's samples look like digits? Measured per sampler setting.

For each setting: 1000 class-conditional samples (100 per class, seed 0), and the share that
an SVC trained on the real digits assigns to the class they were generated for. Prints a
markdown table; with --grid, also writes the sample grid of the first setting.

    OMP_NUM_THREADS=2 python benchmarks/digits_teacher.py [--model FOLDER] [--grid PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from leandit import demo
from leandit.assets import digits_teacher_path
from leandit.data.digits import to_digits_range
from leandit.evaluate.digits import class_agreement, held_out_accuracy
from leandit.evaluate.sampling import generate, make_labels, save_grid, to_uint8_images
from leandit.models import load_model
from leandit.models.flops import count_parameters

# (sampler, steps, guidance scale); the first is the demo's own setting.
SETTINGS = [
    (demo.SAMPLER, demo.DemoSettings().sampling_steps, demo.CFG_SCALE),
    ("ddim", 25, 1.0),
    ("ddim", 100, 1.0),
    ("ddpm", 250, 1.0),
    ("ddim", 50, 1.5),
    ("ddim", 50, 2.0),
    ("ddim", 50, 4.0),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the embedded teacher)")
    parser.add_argument("--per-class", type=int, default=100, help="samples per class (default 100)")
    parser.add_argument("--grid", type=Path, default=None, help="write the first setting's grid (10 per class) here")
    args = parser.parse_args()
    folder = args.model or digits_teacher_path()
    model = load_model(folder)
    k = model.config.num_classes
    labels = make_labels(args.per_class * k, k)
    print("# Digits teacher: do its samples look like the asked digit?\n")
    print(f"`OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/digits_teacher.py`: "
          f"{args.per_class * k} samples per setting ({args.per_class} per class), seed 0.\n")
    print(f"- model: {folder.name} ({count_parameters(model) / 1e6:.2f} M parameters)")
    print(f"- machine: {_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}")
    print(f"- classifier: SVC on the real digits, {held_out_accuracy():.1%} on a 25 % held-out split\n")
    print("| sampler | steps | guidance | class agreement | seconds |")
    print("|---|---|---|---|---|")
    for i, (sampler, steps, scale) in enumerate(SETTINGS):
        started = time.perf_counter()
        x = generate(model, labels, sampler=sampler, steps=steps, cfg_scale=scale, seed=0, batch_size=500, progress=False)
        seconds = time.perf_counter() - started
        agreement = class_agreement(to_digits_range(x), labels.numpy())
        print(f"| {sampler} | {steps} | {scale:g} | {agreement:.1%} | {seconds:.1f} |", flush=True)
        if i == 0 and args.grid:
            save_grid(args.grid, to_uint8_images(x, "pixel")[: 10 * k], ncols=k, column_labels=[str(c) for c in range(k)])


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


if __name__ == "__main__":
    main()
