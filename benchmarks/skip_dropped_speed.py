"""Time one learnable-pruning step (LoRA r8 on every block Linear, 1:2, AdamW, clipping) with
and without skipping the backward of gate-0 images, side by side in one process.

    OMP_NUM_THREADS=2 python benchmarks/skip_dropped_speed.py --rounds 5

Random weights; shapes of the issue: 12 blocks of width 192 at batch 128 (16 tokens) and of
width 384 at batch 32 (64 tokens). Rounds alternate the two settings; the table shows medians.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import leandit
from leandit.compress.depth import LearnablePruningJob, LearnableSettings
from leandit.diffusion import StepRandom

SHAPES = [(192, 3, 8, 128), (384, 6, 16, 32)]  # width, heads, image size (patch 2), batch


def make_job(width: int, heads: int, size: int, skip: str) -> LearnablePruningJob:
    torch.manual_seed(0)
    model = leandit.build_model("DiT-S/2", input_size=size, in_channels=4, hidden_size=width, num_heads=heads,
                                depth=12, num_classes=1000, space="latent")
    job = LearnablePruningJob(model, LearnableSettings(scheme="1:2", recoverability="lora", skip_dropped_backward=skip))
    job.setup(torch.device("cpu"))
    return job


def time_steps(job: LearnablePruningJob, batch, steps: int, start: int) -> float:
    params = [p for g in job.parameter_groups() for p in g["params"]]
    optimizer = job._bench_optimizer if hasattr(job, "_bench_optimizer") else torch.optim.AdamW(params, lr=1e-4)
    job._bench_optimizer = optimizer
    began = time.perf_counter()
    for step in range(start, start + steps):
        job.on_step_start(step, 1000)
        loss, _ = job.compute_loss(job.module, batch, StepRandom(0, step, len(batch[0]), 0, 1, "cpu"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
    return (time.perf_counter() - began) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round and setting")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| blocks x width | batch | tokens | plain step (ms) | skip step (ms) | skip / plain |")
    print("|---|---|---|---|---|---|")
    for width, heads, size, batch_size in SHAPES:
        gen = torch.Generator().manual_seed(0)
        batch = (torch.randn(batch_size, 4, size, size, generator=gen), torch.randint(0, 1000, (batch_size,), generator=gen))
        jobs = {skip: make_job(width, heads, size, skip) for skip in ("off", "on")}
        for job in jobs.values():
            time_steps(job, batch, 1, 0)  # warm-up
        times = {skip: [] for skip in jobs}
        for r in range(args.rounds):
            for skip, job in jobs.items():
                times[skip].append(time_steps(job, batch, args.steps, 1 + r * args.steps))
        plain, skip = statistics.median(times["off"]), statistics.median(times["on"])
        print(f"| 12 x {width} | {batch_size} | {(size // 2) ** 2} | {plain:.0f} | {skip:.0f} | {skip / plain:.2f} |", flush=True)


if __name__ == "__main__":
    main()
