"""Reproducible randomness that does not depend on how work is split.

Sampling draws every image's noise from its own generator, seeded by (seed, image index),
so image i is the same whatever the batch size, the number of processes or a resume point.
Training draws a step's randomness for the whole global batch from a generator seeded by
(seed, step) and each process takes its slice, so a run on 1 or K processes, interrupted or
not, sees the same noise, timesteps and label drops.
"""

from __future__ import annotations

from typing import Sequence

import torch

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, index) pairs over seeds


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts (order matters)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * _MIX + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


class PerSampleNoise:
    """Standard normal noise for a batch of images with fixed per-image seeds.

    Each call to `randn` advances every image's own generator, so a sampler that asks for
    fresh noise at each step gets the same stream for image i in any batch.
    """

    def __init__(self, seed: int, indices: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator().manual_seed(mix_seed(seed, i)) for i in indices]

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        """(len(indices), *shape) standard normal noise on the device."""
        if not self.generators:
            return torch.empty((0, *shape), device=self.device)
        noise = torch.stack([torch.randn(tuple(shape), generator=g) for g in self.generators])
        return noise.to(self.device)


class StepRandom:
    """A training step's randomness for the global batch, sliced to this process.

    `global_batch` samples are drawn from a generator seeded by (seed, step); this process
    owns rows [rank * local, (rank + 1) * local).
    """

    def __init__(self, seed: int, step: int, global_batch: int, rank: int, world_size: int, device):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of {world_size} processes")
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        self.local = global_batch // world_size
        self.global_batch = global_batch
        self.start = rank * self.local
        self.device = torch.device(device)
        # Drawn where it is used: a GPU draws the global batch's noise in microseconds, and
        # every process of a run has the same kind of device, so the draws still agree.
        self.generator = torch.Generator(self.device).manual_seed(mix_seed(seed, step))

    def _slice(self, full: torch.Tensor) -> torch.Tensor:
        return full[self.start : self.start + self.local]

    def randn(self, *shape: int) -> torch.Tensor:
        """(local batch, *shape) standard normal."""
        return self._slice(torch.randn(self.global_batch, *shape, generator=self.generator, device=self.device))

    def rand(self, *shape: int) -> torch.Tensor:
        """(local batch, *shape) uniform in [0, 1)."""
        return self._slice(torch.rand(self.global_batch, *shape, generator=self.generator, device=self.device))

    def shared_rand(self) -> torch.Tensor:
        """One uniform value in [0, 1), the same on every process: a choice made once per
        global batch (MAR's mask ratio)."""
        return torch.rand(1, generator=self.generator, device=self.device)[0]

    def randint(self, low: int, high: int, *shape: int) -> torch.Tensor:
        """(local batch, *shape) integers in [low, high)."""
        return self._slice(
            torch.randint(low, high, (self.global_batch, *shape), generator=self.generator, device=self.device)
        )
