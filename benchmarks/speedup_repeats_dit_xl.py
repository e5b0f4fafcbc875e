"""The speed-up of depth and width pruning of DiT-XL/2 (random weights) over repeated,
interleaved measurements: the spread behind the single run of speedup_curve_dit_xl_cpu.md.

    OMP_NUM_THREADS=2 python benchmarks/speedup_repeats_dit_xl.py --repeats 5 --rounds 3

The full model and its depth- and width-pruned versions (`leandit.evaluate.speed.
compression_variants`, as `leandit bench --curve` builds them) are timed by `measure_speed`
(every round times each model once, in turn) `--repeats` times; each repeat gives a speed-up
per variant (ratio of medians of its rounds). Reported: mean ± standard deviation and range of
those speed-ups, and the compute ratio (the linear limit).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import leandit
from leandit.evaluate.speed import compression_variants, measure_speed
from leandit.models.flops import forward_flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-XL/2")
    parser.add_argument("--keep", default="0.5,0.25", help="kept fractions (default 0.5,0.25)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per repeat (default 3)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    with torch.no_grad():
        model = leandit.build_model(args.model).eval()
        variants = compression_variants(model, [float(f) for f in args.keep.split(",")])
    models = [(name, m.eval()) for _, name, _, m in variants]
    full_flops = forward_flops(model, args.batch_size)
    ratios = {name: full_flops / forward_flops(m, args.batch_size) for name, m in models}
    speedups: dict[str, list[float]] = {name: [] for name, _ in models}
    started = time.perf_counter()
    for r in range(args.repeats):
        results = measure_speed(models, args.batch_size, cfg_scale=1.0, sampling_steps=1, warmup=1, rounds=args.rounds)
        for result in results:
            speedups[result.name].append(result.speedup)
        print(f"repeat {r + 1}: " + ", ".join(f"{x.name} {x.speedup:.3f}x" for x in results), flush=True)
    minutes = (time.perf_counter() - started) / 60
    lines = [
        f"# Speed-up of depth and width pruning of {args.model} over {args.repeats} repeated measurements",
        "",
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} python benchmarks/speedup_repeats_dit_xl.py "
        f"--repeats {args.repeats} --rounds {args.rounds} --keep {args.keep}` ({time.strftime('%Y-%m-%d')}, {minutes:.0f} min). "
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs (`nice`), {threads} threads, fp32, "
        f"torch {torch.__version__}. Random weights, batch {args.batch_size}, no guidance; every repeat is "
        f"`measure_speed` with {args.rounds} interleaved rounds after 1 warm-up, its speed-up the ratio of medians.",
        "",
        "| variant | compute ratio (linear limit) | speed-up: mean ± std [min, max] | share of the limit |",
        "|---|---|---|---|",
    ]
    for name, values in speedups.items():
        mean = statistics.mean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {name} | {ratios[name]:.2f}x | {mean:.2f} ± {std:.2f} [{min(values):.2f}, {max(values):.2f}] | "
                     f"{100 * mean / ratios[name]:.0f} % |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
