"""Depth methods on a backbone with several block lists (MAR: encoder, then decoder).

The lists are one ordered list for every depth method (`leandit.models.blocks`), so a scheme's
group may span the end of one list and the start of the next. That is allowed: each block is
a residual block gated on its own input, so any subset runs. But the blocks on either side of
a boundary are not interchangeable the way neighbouring blocks of one list are (MAR's encoder
blocks see the buffer and the known tokens; its decoder blocks see every position, the mask
tokens included, at the decoder's width), so a group that crosses is reported (a warning and
`crosses` in its compression record), and recovery never aligns a block with a block of
another list (`leandit.compress.recovery.alignment`).

Some lists must keep a block: without decoder blocks a MAR's unknown positions never see the
known tokens or the class (the mask token enters after the encoder), so every unknown token
would be predicted from its position alone. Removing every encoder block is fine (the decoder
still attends over the buffer and the known tokens).
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from ...backbones import find_adapter
from ...models.blocks import list_ranges
from .scheme import Scheme

def required_lists(model: nn.Module) -> dict[str, str]:
    """{list attribute: why it must keep a block} of `model`'s backbone (empty for most): what
    its adapter declares in `required_block_lists`."""
    adapter = find_adapter(model)
    if adapter is None:
        return {}
    return dict(adapter.required_block_lists)


def list_of(ranges: Sequence[tuple[str, int, int]], index: int) -> str:
    """The list holding combined block `index`."""
    for name, start, stop in ranges:
        if start <= index < stop:
            return name
    raise ValueError(f"block {index} is outside the block lists {[(n, a, b) for n, a, b in ranges]}")


def crossing_groups(scheme: Scheme, ranges: Sequence[tuple[str, int, int]]) -> list[tuple[int, list[str]]]:
    """(group index, the lists it spans) of every group of `scheme` spanning several lists."""
    out = []
    for index, group in enumerate(scheme.groups):
        names = list(dict.fromkeys(list_of(ranges, i) for i in group.layers))
        if len(names) > 1:
            out.append((index, names))
    return out


def describe_crossing(scheme: Scheme, ranges: Sequence[tuple[str, int, int]]) -> str | None:
    """A warning line for the groups of `scheme` that span a list boundary; None when none do."""
    crossing = crossing_groups(scheme, ranges)
    if not crossing:
        return None
    parts = []
    for index, names in crossing[:3]:
        g = scheme.groups[index]
        parts.append(f"group {g.n}:{g.m} over blocks {g.start}-{g.start + g.m - 1} spans {' and '.join(names)}")
    more = f" (and {len(crossing) - 3} more)" if len(crossing) > 3 else ""
    return (f"scheme {scheme}: {'; '.join(parts)}{more}. Blocks on either side of a list boundary are not "
            "interchangeable neighbours (they see other tokens); the choice is allowed and recorded, and recovery aligns "
            "each block only with blocks of its own list")


def check_kept_lists(model: nn.Module, kept: Sequence[int]) -> None:
    """Refuse a choice that empties a list the model cannot do without."""
    needed = required_lists(model)
    if not needed:
        return
    kept_set = set(int(i) for i in kept)
    for name, start, stop in list_ranges(model):
        if name in needed and not kept_set & set(range(start, stop)):
            raise ValueError(
                f"the choice {sorted(kept_set)} keeps none of the {name} (blocks {start}-{stop - 1}): {needed[name]}; "
                f"keep at least one of them (a --scheme whose groups lie within the lists, or --indices)"
            )


def check_scheme_lists(model: nn.Module, scheme: Scheme) -> None:
    """Refuse a scheme under which some allowed choice empties a list the model cannot do
    without (learnable pruning may end on any of them): every group overlapping such a list
    must have to keep one of its blocks there (N larger than its blocks outside the list)."""
    needed = required_lists(model)
    for name, start, stop in list_ranges(model):
        if name not in needed:
            continue
        inside = set(range(start, stop))
        if all(g.n <= len([i for i in g.layers if i not in inside]) for g in scheme.groups):
            overlapping = [g for g in scheme.groups if inside & set(g.layers)]
            g = overlapping[0] if overlapping else scheme.groups[0]
            raise ValueError(
                f"scheme {scheme} may keep none of the {name} (blocks {start}-{stop - 1}; e.g. group {g.n}:{g.m} over blocks "
                f"{g.start}-{g.start + g.m - 1} can keep only blocks outside them): {needed[name]}; use groups that lie "
                "within the lists, such as 1:2 when both lists have an even depth"
            )


def list_records(model: nn.Module) -> dict[str, Any]:
    """What compression.json needs to know of the source's lists to align across them later:
    each list's depth, in order."""
    return {name: stop - start for name, start, stop in list_ranges(model)}


__all__ = ["check_kept_lists", "check_scheme_lists", "crossing_groups", "describe_crossing",
           "list_of", "list_records", "required_lists"]
