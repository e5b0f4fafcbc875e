"""Do the embedded digits MAR teacher's samples look like digits? Measured per sampling setting.

For each setting: 1000 class-conditional samples (100 per class, seed 0) by MAR's unmasking
loop; the share that an SVC trained on the real digits assigns to the class they were
generated for, and digits-FID against the 1797 real digits. Prints a markdown table; with
--grid, also writes the sample grid of the first setting (the demo's).

    OMP_NUM_THREADS=1 python benchmarks/digits_mar_teacher.py [--model FOLDER] [--grid PATH]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from leandit.assets import digits_mar_teacher_path
from leandit.data.digits import to_digits_range
from leandit.demo import MAR_SAMPLING, mar_generation_macs, mar_samples
from leandit.evaluate.digits import class_agreement, held_out_accuracy
from leandit.evaluate.digits_features import digits_as_uint8, load_digits_features
from leandit.evaluate.feature_nets import extract_features
from leandit.evaluate.metrics import all_metrics
from leandit.evaluate.sampling import make_labels, save_grid, to_uint8_images
from leandit.models import load_model
from leandit.models.flops import count_parameters

from digits_teacher import _cpu_name  # noqa: E402  (run from the repository root or benchmarks/)

# (unmasking steps, guidance scale, head temperature, head respacing); the first is the demo's.
SETTINGS = [
    tuple(MAR_SAMPLING[k] for k in ("num_iter", "cfg_scale", "temperature", "head_steps")),
    (8, 1.0, 1.0, "ddim50"),
    (8, 1.0, 1.0, "ddim100"),
    (8, 1.0, 1.0, 100),  # the release's respacing: it starts at t = 999
    (8, 1.0, 1.0, "ddim25"),
    (4, 1.0, 1.0, "ddim50"),
    (16, 1.0, 1.0, "ddim50"),
    (8, 1.0, 0.9, "ddim50"),
    (8, 1.5, 1.0, "ddim50"),
    (8, 3.0, 1.0, "ddim50"),
    (16, 2.0, 1.0, "ddim50"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the embedded MAR teacher)")
    parser.add_argument("--per-class", type=int, default=100, help="samples per class (default 100)")
    parser.add_argument("--grid", type=Path, default=None, help="write the first setting's grid (10 per class) here")
    args = parser.parse_args()
    folder = args.model or digits_mar_teacher_path()
    model = load_model(folder)
    k = model.config.num_classes
    labels = make_labels(args.per_class * k, k)
    net = load_digits_features()
    reference = extract_features(net, digits_as_uint8()[0], progress=False)
    print("# Digits MAR teacher: do its samples look like the asked digit?\n")
    print(f"`OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/digits_mar_teacher.py`: "
          f"{args.per_class * k} samples per setting ({args.per_class} per class), seed 0.\n")
    print(f"- model: {folder.name} ({count_parameters(model) / 1e6:.2f} M parameters)")
    print(f"- machine: {_cpu_name()}, {os.cpu_count()} cores (shared with other jobs), {torch.get_num_threads()} torch "
          f"thread(s), torch {torch.__version__}")
    print(f"- classifier: SVC on the real digits, {held_out_accuracy():.1%} on a 25 % held-out split\n")
    print("| unmasking steps | guidance | temperature | head timesteps | class agreement | digits-FID | MMACs / image | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for i, (num_iter, scale, temperature, head_steps) in enumerate(SETTINGS):
        sampling = {"num_iter": num_iter, "cfg_scale": scale, "temperature": temperature, "head_steps": head_steps}
        started = time.perf_counter()
        x = mar_samples(model, labels, **sampling)
        seconds = time.perf_counter() - started
        agreement = class_agreement(to_digits_range(x), labels.numpy())
        images = to_uint8_images(x, "pixel")
        fid = all_metrics(extract_features(net, images, progress=False), reference)["fid"]
        macs = mar_generation_macs(model, **sampling)["total"]
        print(f"| {num_iter} | {scale:g} | {temperature:g} | {head_steps} | {agreement:.1%} | {fid:.2f} | {macs / 1e6:.0f} | "
              f"{seconds:.1f} |", flush=True)
        if i == 0 and args.grid:
            save_grid(args.grid, images[: 10 * k], ncols=k, column_labels=[str(c) for c in range(k)])


if __name__ == "__main__":
    main()
