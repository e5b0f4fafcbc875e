"""A backbone seen as an ordered list of blocks plus what runs before and after them.

Every depth method needs three things from a model, and only these: its block list, a way to
run it with a subset of the blocks, and a copy with fewer blocks that saves and loads like
any other model. They are answered here once per kind of backbone, so gating, baselines and
export never ask which network they hold.

A backbone's adapter (`leandit.backbones`) names its block list(s) and records a new depth;
a backbone with several lists (MAR: encoder, then decoder) is one ordered list here, so a
depth method's block i is the same block in gating, baselines, export and distillation.
Other modules with a `blocks` or `transformer_blocks` ModuleList work for running and
capturing (tests, custom models) but cannot be exported.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator, Sequence

import torch
from torch import nn

BLOCK_LIST_NAMES = ("blocks", "transformer_blocks")


def block_list_names(model: nn.Module) -> tuple[str, ...]:
    """The attributes holding the model's blocks, in the order they run (MAR: encoder_blocks,
    decoder_blocks); depth methods treat them as one list, the first list's blocks first."""
    from ..backbones import backbone, find_adapter

    if find_adapter(model) is not None:
        return tuple(backbone(model).block_list_names)  # the backbone's, inside DDP or compression wrappers
    for name in BLOCK_LIST_NAMES:
        if isinstance(getattr(model, name, None), nn.ModuleList):
            return (name,)
    raise ValueError(
        f"{type(model).__name__} has no block list ({' or '.join(BLOCK_LIST_NAMES)} as an nn.ModuleList): "
        "depth methods need a backbone whose blocks run in order"
    )


def block_list_name(model: nn.Module) -> str:
    """The one block list's attribute (methods that replace the list refuse several)."""
    names = block_list_names(model)
    if len(names) != 1:
        raise ValueError(f"{type(model).__name__} has {len(names)} block lists ({', '.join(names)}): this method needs one")
    return names[0]


def list_ranges(model: nn.Module) -> list[tuple[str, int, int]]:
    """(attribute, first index, end index) of each block list in the combined order."""
    ranges, start = [], 0
    for name in block_list_names(model):
        size = len(getattr(model, name))
        ranges.append((name, start, start + size))
        start += size
    return ranges


def kept_by_list(model: nn.Module, kept: Sequence[int]) -> dict[str, list[int]]:
    """Combined block indices `kept` -> each list's kept indices within that list."""
    return {name: [i - start for i in kept if start <= i < stop] for name, start, stop in list_ranges(model)}


def block_list(model: nn.Module) -> nn.ModuleList:
    """The model's blocks, in the order they run (all lists, first list first; the blocks
    themselves, not copies)."""
    names = block_list_names(model)
    if len(names) == 1:
        return getattr(model, names[0])
    return nn.ModuleList(block for name in names for block in getattr(model, name))


def depth_of(model: nn.Module) -> int:
    return sum(len(getattr(model, name)) for name in block_list_names(model))


@contextlib.contextmanager
def running_blocks(model: nn.Module, kept: Sequence[int]) -> Iterator[nn.Module]:
    """Run `model` with only the blocks `kept` (shared, not copied) for the duration: the
    cheap way to evaluate many masks, since removed blocks cost nothing."""
    lists = {name: getattr(model, name) for name in block_list_names(model)}
    for name, indices in kept_by_list(model, kept).items():
        setattr(model, name, nn.ModuleList(lists[name][i] for i in indices))
    try:
        yield model
    finally:
        for name, full in lists.items():
            setattr(model, name, full)


def hidden_states_of(output: Any) -> torch.Tensor:
    """The image tokens a block returns: the tensor itself, or the last element of the tuple
    that SD3/Flux blocks return (encoder_hidden_states, hidden_states)."""
    return output[-1] if isinstance(output, tuple) else output


@contextlib.contextmanager
def capturing_block_outputs(model: nn.Module, indices: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """While inside, every forward of `model` stores the hidden states that blocks `indices`
    return into the yielded dict (index -> tensor, graph kept, so losses on them train the
    blocks). The dict holds the latest forward's outputs."""
    blocks = block_list(model)
    for index in indices:
        if not 0 <= index < len(blocks):
            raise ValueError(f"block {index} does not exist: the model has {len(blocks)} blocks")
    outputs: dict[int, torch.Tensor] = {}

    def hook(index: int):
        def store(module: nn.Module, args: tuple, output: Any) -> None:
            outputs[index] = hidden_states_of(output)

        return store

    handles = [blocks[i].register_forward_hook(hook(i)) for i in sorted(set(indices))]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def keep_blocks(model: nn.Module, kept: Sequence[int]) -> nn.Module:
    """A standalone copy of `model` with only the blocks `kept` (combined indices), in order,
    and a config that says so. The source model is untouched."""
    per_list = kept_by_list(model, kept)
    lists = {name: getattr(model, name) for name in per_list}
    # Copy the model without its blocks, then only the kept blocks: a 28 -> 14 copy of a
    # large model never holds the 14 removed blocks twice.
    for name in lists:
        setattr(model, name, nn.ModuleList())
    try:
        pruned = copy.deepcopy(model)
    finally:
        for name, full in lists.items():
            setattr(model, name, full)
    for name, indices in per_list.items():
        setattr(pruned, name, nn.ModuleList(copy.deepcopy(lists[name][i]) for i in indices))
    _set_depths(pruned, [len(indices) for indices in per_list.values()])
    return pruned


def _set_depths(model: nn.Module, depths: list[int]) -> None:
    from ..backbones import backbone

    adapter = backbone(model)
    if len(depths) == 1:
        adapter.set_depth(depths[0])
    else:
        adapter.set_list_depths(depths)
