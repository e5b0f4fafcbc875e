"""Sampling-step speed of a depth-pruned DiT-XL/2 (D14) with leandit's speed options, against
the original eager DiT-XL/2 (D28), side by side in one process.

    OMP_NUM_THREADS=2 python benchmarks/sampling_speed_dit_xl.py --rounds 3
    python benchmarks/sampling_speed_dit_xl.py --device cuda --batch-size 16 --rounds 20   # on a GPU

A step is one guided forward (2 x batch, as `leandit sample --cfg-scale 1.5` runs it) of random
DiT-XL/2 weights (the speed does not depend on them). Rows: D28 eager in fp32 and bf16, D28 and
D14 compiled in bf16 (`leandit sample --precision bf16 --compile`), D14 eager, and on a GPU D14
with CUDA graphs (`--cuda-graphs`). Rounds alternate the rows; the table shows medians and the
speed-up over D28 eager bf16, the issue's baseline.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch

import leandit
from leandit.devices import compile_for_sampling
from leandit.evaluate.speed import sampling_step, seconds_of
from leandit.models.blocks import keep_blocks

D14 = [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27]  # TinyFusion's oracle choice; any 14 cost the same


def rows(device: torch.device) -> list[tuple[str, torch.nn.Module, str, str | None]]:
    """(name, model, precision, compile mode) per row."""
    torch.manual_seed(0)
    d28 = leandit.build_model("DiT-XL/2", input_size=32).eval().requires_grad_(False)
    d14 = keep_blocks(d28, D14)
    table = [("D28 eager fp32", d28, "fp32", None), ("D28 eager bf16", d28, "bf16", None),
             ("D28 compiled bf16", copy.deepcopy(d28), "bf16", "compile"),
             ("D14 eager bf16", d14, "bf16", None), ("D14 compiled bf16", copy.deepcopy(d14), "bf16", "compile")]
    if device.type == "cuda":
        table.append(("D14 CUDA graphs bf16", copy.deepcopy(d14), "bf16", "cuda-graphs"))
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=2, help="images per step (the forward runs 2 x batch)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if cuda else f"{platform.processor() or platform.machine()} CPU"
    print(f"machine: {where}, {torch.get_num_threads()} threads, torch {torch.__version__}; batch {args.batch_size} guided "
          f"(forward of {2 * args.batch_size})")
    runs = []
    for name, model, precision, mode in rows(device):
        model.to(device)
        if mode is not None:
            compile_for_sampling(model, device, cuda_graphs=mode == "cuda-graphs")
        step = sampling_step(model, args.batch_size, 1.5, device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        began = time.perf_counter()
        with torch.inference_mode(), autocast:
            for _ in range(3 if mode else 1):  # compile (and record the graph) first
                step()
        print(f"{name}: warm-up {time.perf_counter() - began:.0f} s", flush=True)
        runs.append((name, step, autocast))
    times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    for _ in range(args.rounds):
        for name, step, autocast in runs:
            with torch.inference_mode(), autocast:
                times[name].append(seconds_of(step, device) * 1000)
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["D28 eager bf16"]
    print("| model | ms per step | speed-up over D28 eager bf16 |")
    print("|---|---|---|")
    for name, ms in medians.items():
        print(f"| {name} | {ms:,.0f} | **{base / ms:.2f}x** |")


if __name__ == "__main__":
    main()
