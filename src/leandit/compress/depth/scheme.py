"""Local N:M depth schemes: which blocks may be kept together.

The L consecutive blocks are split into groups; group g spans M_g consecutive blocks and keeps
N_g of them. "1:2" on 28 blocks means 14 groups of two, one kept in each. Mixed groups are a
list of (N, M) pairs whose M's add up to the depth, written "1:2,2:4,1:2" on the command line.

Candidate order (fixed, so that logits, logs and decisions mean the same thing everywhere):
a group's candidates are the N-subsets of its M positions in lexicographic order, as
`itertools.combinations(range(M), N)` yields them. For 2:4 that is
{0,1}, {0,2}, {0,3}, {1,2}, {1,3}, {2,3}.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch

# More candidates than this in one group would make one categorical distribution too large
# to learn (7:14 already has 3,432 and did not converge in the paper).
MAX_CANDIDATES = 100_000


@dataclass(frozen=True)
class Group:
    """Blocks [start, start + m) of which n are kept."""

    start: int
    n: int
    m: int

    @property
    def layers(self) -> list[int]:
        return list(range(self.start, self.start + self.m))

    @property
    def num_candidates(self) -> int:
        return math.comb(self.m, self.n)

    def candidates(self) -> torch.Tensor:
        """(C(M, N), M) 0/1 matrix, one candidate mask per row, in lexicographic order."""
        rows = torch.zeros(self.num_candidates, self.m)
        for row, kept in enumerate(itertools.combinations(range(self.m), self.n)):
            rows[row, list(kept)] = 1.0
        return rows

    def random_masks(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """(count, M) masks, each N-subset equally likely."""
        if self.num_candidates <= 4096:
            return self.candidates()[torch.randint(0, self.num_candidates, (count,), generator=generator)]
        # Too many subsets to list (any 14 of 28): a random permutation's first N is uniform too.
        masks = torch.zeros(count, self.m)
        for row in range(count):
            masks[row, torch.randperm(self.m, generator=generator)[: self.n]] = 1.0
        return masks


@dataclass(frozen=True)
class Scheme:
    """The groups of a depth, in order. Build with `parse_scheme`."""

    groups: tuple[Group, ...]

    @property
    def depth(self) -> int:
        return sum(g.m for g in self.groups)

    @property
    def num_kept(self) -> int:
        return sum(g.n for g in self.groups)

    @property
    def num_candidates(self) -> int:
        """How many distinct masks the scheme allows."""
        return math.prod(g.num_candidates for g in self.groups)

    def __str__(self) -> str:
        if len(self.groups) == 1 and self.groups[0].num_candidates > MAX_CANDIDATES:
            return f"{self.groups[0].n} of {self.groups[0].m}"  # a global choice, not a learnable group
        pairs = [f"{g.n}:{g.m}" for g in self.groups]
        if len(set(pairs)) == 1:
            return pairs[0]
        return ",".join(pairs)

    def mask_from_choices(self, choices: Sequence[int]) -> torch.Tensor:
        """(L,) 0/1 layer mask from one candidate index per group."""
        if len(choices) != len(self.groups):
            raise ValueError(f"need one choice per group ({len(self.groups)}), got {len(choices)}")
        return torch.cat([g.candidates()[c] for g, c in zip(self.groups, choices)])

    def kept_from_choices(self, choices: Sequence[int]) -> list[int]:
        return mask_to_indices(self.mask_from_choices(choices))

    def random_masks(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """(count, L) masks drawn uniformly from the scheme's candidates."""
        return torch.cat([g.random_masks(count, generator) for g in self.groups], dim=1)

    def fits(self, mask: torch.Tensor) -> bool:
        """Whether a (L,) 0/1 mask keeps exactly N_g blocks in every group."""
        return mask.numel() == self.depth and all(
            int(mask[g.start : g.start + g.m].sum()) == g.n for g in self.groups
        )


_PAIR = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_scheme(spec: str | Sequence[tuple[int, int]], depth: int) -> Scheme:
    """A scheme for `depth` blocks from "N:M" (repeated over the depth), "N:M,N:M,..." or a
    list of (N, M) pairs (mixed groups, whose M's must add up to the depth)."""
    if isinstance(spec, str):
        pairs = []
        for part in spec.split(","):
            match = _PAIR.match(part)
            if not match:
                raise ValueError(f"scheme {spec!r}: {part.strip()!r} is not N:M (examples: 1:2, 2:4, 1:2,2:4,1:2)")
            pairs.append((int(match.group(1)), int(match.group(2))))
        repeat = len(pairs) == 1
    else:
        pairs = [(int(n), int(m)) for n, m in spec]
        repeat = False
        if not pairs:
            raise ValueError("a scheme needs at least one (N, M) group")
    for n, m in pairs:
        if m < 1 or not 1 <= n <= m:
            raise ValueError(f"scheme group {n}:{m}: N must be between 1 and M (keep at least one block of each group)")
    if repeat:
        n, m = pairs[0]
        if depth % m:
            raise ValueError(
                f"scheme {n}:{m} does not fit a depth of {depth}: {depth} is not a multiple of {m}; "
                f"pick M dividing {depth} or give mixed groups such as {_mixed_hint(n, m, depth)}"
            )
        pairs = pairs * (depth // m)
    total = sum(m for _, m in pairs)
    if total != depth:
        raise ValueError(f"scheme {spec!r} covers {total} blocks but the model has {depth}; the M's must add up to {depth}")
    groups, start = [], 0
    for n, m in pairs:
        group = Group(start, n, m)
        if group.num_candidates > MAX_CANDIDATES:
            raise ValueError(
                f"scheme group {n}:{m} has {group.num_candidates:,} candidate masks, more than {MAX_CANDIDATES:,}; "
                "use smaller groups (1:2 and 2:4 work best)"
            )
        groups.append(group)
        start += m
    return Scheme(tuple(groups))


def _mixed_hint(n: int, m: int, depth: int) -> str:
    whole, rest = divmod(depth, m)
    pairs = [f"{n}:{m}"] * whole
    if rest:
        pairs.append(f"{max(1, round(n * rest / m))}:{rest}")
    return ",".join(pairs)


def global_scheme(depth: int, keep: int) -> Scheme:
    """One group over the whole depth: any `keep` of the `depth` blocks (the paper's random
    and score-ranked baselines)."""
    if not 1 <= keep <= depth:
        raise ValueError(f"cannot keep {keep} of {depth} blocks: choose between 1 and {depth}")
    return Scheme((Group(0, keep, depth),))


def mask_to_indices(mask: torch.Tensor) -> list[int]:
    return [int(i) for i in torch.nonzero(mask > 0.5).flatten()]


def indices_to_mask(indices: Sequence[int], depth: int) -> torch.Tensor:
    check_kept(indices, depth)
    mask = torch.zeros(depth)
    mask[list(indices)] = 1.0
    return mask


def check_kept(indices: Sequence[int], depth: int) -> list[int]:
    """Sorted, validated kept-block indices."""
    kept = sorted(int(i) for i in indices)
    if not kept:
        raise ValueError("keep at least one block")
    if len(set(kept)) != len(kept):
        raise ValueError(f"kept block indices repeat: {kept}")
    if kept[0] < 0 or kept[-1] >= depth:
        raise ValueError(f"kept block indices {kept} out of range: the model has blocks 0..{depth - 1}")
    return kept
