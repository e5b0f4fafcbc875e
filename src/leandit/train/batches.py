"""Which data items each process reads at each step: a pure function of (seed, step).

Epoch e shuffles all items with a generator seeded by (seed, e); step i of the epoch takes
the i-th block of `global_batch` items, and process r takes its contiguous share. Nothing
needs saving to resume, and a run on K processes reads the same global batches as a run on
one. The last incomplete block of an epoch is dropped, as DiT does.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..diffusion.noise import mix_seed


class StepBatches:
    """A batch sampler (for torch's DataLoader) over steps [start_step, total_steps)."""

    def __init__(
        self,
        num_items: int,
        global_batch: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        total_steps: int,
    ):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        if num_items < global_batch:
            raise ValueError(
                f"the data set has {num_items} items, fewer than one global batch of {global_batch}; "
                "use a smaller --batch-size"
            )
        self.num_items = num_items
        self.global_batch = global_batch
        self.local = global_batch // world_size
        self.seed, self.rank = seed, rank
        self.start_step, self.total_steps = start_step, total_steps
        self.steps_per_epoch = num_items // global_batch
        self._epoch, self._perm = -1, None

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def indices(self, step: int) -> list[int]:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, 0xDA7A, epoch))
            # A list, read once per epoch: a step's indices are then no tensor read.
            self._perm, self._epoch = torch.randperm(self.num_items, generator=gen).tolist(), epoch
        start = i * self.global_batch + self.rank * self.local
        return self._perm[start : start + self.local]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.total_steps):
            yield self.indices(step)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)
