"""Shared fixtures: tiny models and data on CPU, and running the CLI as a user does.

Tests that take more than ~20 s on 2 CPU cores are marked `slow`: `pytest -m "not slow"` is the
quick run, the plain `pytest` runs everything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import leandit

ROOT = Path(__file__).resolve().parents[1]

# Tests run tiny models: one intra-op thread is faster for them, and two OpenMP threads spin
# badly (20-70x slower) when another process holds one of the two cores.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"  # for the subprocesses the tests start


def tiny_model(**overrides) -> leandit.DiT:
    """A 2-block DiT on 8x8 one-channel images with 10 classes: runs in milliseconds."""
    fields = dict(input_size=8, in_channels=1, hidden_size=32, num_heads=2, depth=2, num_classes=10, space="pixel")
    fields.update(overrides)
    return leandit.build_model("DiT-S/2", **fields)


def randomize_(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Re-draw every parameter: the adaLN-Zero init makes outputs trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`leandit ARGS` in a subprocess, as a user runs it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "leandit.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def tiny():
    return tiny_model


class RecordingNoise:
    """A sampler's `noise()` callable: fresh float64 standard normal noise of a fixed shape at
    every call, remembered in order so a reference computation can replay it."""

    def __init__(self, shape, seed, record=True):
        self.shape, self.record = shape, record
        self.gen = torch.Generator().manual_seed(seed)
        self.calls: list[np.ndarray] = []

    def __call__(self):
        z = torch.randn(self.shape, generator=self.gen, dtype=torch.float64)
        if self.record:
            self.calls.append(z.numpy().copy())
        return z
