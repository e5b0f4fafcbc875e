"""leandit's Frechet distance (two symmetric eigendecompositions) against the ADM evaluator's
formula (scipy.linalg.sqrtm of S_a S_b, real part), on 2048-dimensional covariances.

    OMP_NUM_THREADS=2 python benchmarks/frechet_distance.py --out benchmarks/frechet_distance.md

The covariances are those of Inception-like features: N samples of a 2048-dim factor model
with decaying scales (full rank), the second set a perturbed model, so FID is in the usual
range; a third pair draws both sets from the same model (FID near 0, where a relative error
is largest). Reported: both values, their relative and absolute difference, and the median
wall time of each (the covariances are computed once, outside the timing).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import scipy
import scipy.linalg
import torch

from leandit.evaluate.metrics import GaussianStats, frechet_distance


def adm_frechet(a: GaussianStats, b: GaussianStats, eps: float = 1e-6) -> float:
    """The ADM evaluator's definition: ||mu_a - mu_b||^2 + tr S_a + tr S_b - 2 tr sqrtm(S_a S_b),
    the square root by scipy (an eps offset on the diagonals if it is not finite; the real part)."""
    diff = a.mu - b.mu
    covmean, _ = scipy.linalg.sqrtm(a.sigma.dot(b.sigma), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(a.sigma.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((a.sigma + offset).dot(b.sigma + offset))
    covmean = np.real(covmean)
    return float(diff.dot(diff) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


def features(rng: np.random.Generator, mixing: np.ndarray, n: int, shift: float) -> np.ndarray:
    z = rng.standard_normal((n, mixing.shape[0]))
    return 8 * np.maximum(z @ mixing + shift, 0)  # ReLU-like and non-negative as pool_3 features; scaled to usual FIDs


def timed(fn, repeats: int) -> tuple[float, float]:
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return value, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=10000, help="feature vectors per set (default 10000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each computation (default 3)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count()
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    d = args.dim
    scales = 1.0 / np.sqrt(1 + np.arange(d))  # decaying spectrum, full rank
    base = rng.standard_normal((d, d)) / np.sqrt(d) * scales[:, None]
    other = base + 0.3 * rng.standard_normal((d, d)) / np.sqrt(d) * scales[:, None]
    pairs = {
        "different models (shift 0.05)": (base, 0.0, other, 0.05),
        "different models (no shift)": (base, 0.0, other, 0.0),
        "same model, other samples": (base, 0.0, base, 0.0),
    }
    rows = []
    for label, (ma, sa, mb, sb) in pairs.items():
        a = GaussianStats.of(features(rng, ma, args.samples, sa))
        b = GaussianStats.of(features(rng, mb, args.samples, sb))
        ours, t_ours = timed(lambda: frechet_distance(a, b), args.repeats)
        adm, t_adm = timed(lambda: adm_frechet(a, b), args.repeats)
        rows.append((label, ours, adm, abs(ours - adm) / abs(adm), abs(ours - adm), t_ours, t_adm))
        print(rows[-1], flush=True)
    lines = [
        "# Frechet distance: two eigendecompositions vs scipy's sqrtm (ADM evaluator formula)",
        "",
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} python benchmarks/frechet_distance.py` "
        f"({time.strftime('%Y-%m-%d')}). Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs "
        f"(times are medians of {args.repeats} and only indicative), numpy {np.__version__}, scipy {scipy.__version__}, "
        f"torch {torch.__version__}. Covariances of {args.samples} feature vectors, {d} dimensions (float64).",
        "",
        "| feature sets | leandit | ADM (scipy sqrtm) | relative difference | absolute difference | leandit time (s) | sqrtm time (s) | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, ours, adm, rel, absolute, t_ours, t_adm in rows:
        lines.append(f"| {label} | {ours:.6f} | {adm:.6f} | {rel:.1e} | {absolute:.1e} | {t_ours:.2f} | {t_adm:.2f} | {t_adm / t_ours:.1f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
