"""The pre-sliced weights of a dynamic block, one entry per width pattern, bounded.

A slice is cut once and reused for every step and image that runs the same pattern. The key
holds the identity and version of every tensor the slice was cut from, so new or updated
weights (a loaded EMA, an optimizer step) slice again. At most `capacity` patterns are kept
per block, least recently used first out: sampling walks the timesteps in order and a trained
width table changes a few times along them, so a few entries serve a whole trajectory (a
pattern evicted is cut again when next used: a copy of part of the block's weights), while an
unbounded cache would hold a copy of the block for every pattern ever seen. The default of 4
is what benchmarks/dydit_speed_dit_xl_cpu.md ran with (4 patterns, 4.3 GB of slices for
DiT-XL/2); lower it (`DynamicModel.slice_cache_capacity(n)`) where memory is tight.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch

DEFAULT_CAPACITY = 4


class SliceCache:
    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        if capacity < 1:
            raise ValueError(f"the slice cache must hold at least 1 pattern, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[Any, tuple] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get(self, pattern: Any, sources: Sequence[torch.Tensor | None], make: Callable[[], tuple]) -> tuple:
        """The slices of `pattern`, cut by `make()` unless cached for these very `sources`."""
        identity = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in sources if p is not None)
        key = (pattern, identity)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        stale = [k for k in self._entries if k[1] != identity]  # slices of weights that changed
        for k in stale:
            del self._entries[k]
        with torch.no_grad():
            entry = make()
        self._entries[key] = entry
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return entry
