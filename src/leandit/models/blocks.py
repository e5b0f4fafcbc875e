"""A backbone seen as an ordered list of blocks plus what runs before and after them.

Every depth method needs three things from a model, and only these: its block list, a way to
run it with a subset of the blocks, and a copy with fewer blocks that saves and loads like
any other model. They are answered here once per kind of backbone, so gating, baselines and
export never ask which network they hold.

A backbone's adapter (`leandit.backbones`) names its block list and records a new depth;
other modules with a `blocks` or `transformer_blocks` ModuleList work for running and
capturing (tests, custom models) but cannot be exported.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator, Sequence

import torch
from torch import nn

BLOCK_LIST_NAMES = ("blocks", "transformer_blocks")


def block_list_name(model: nn.Module) -> str:
    from ..backbones import backbone, find_adapter

    if find_adapter(model) is not None:
        names = backbone(model).block_list_names  # the backbone's, inside DDP or compression wrappers
        if len(names) != 1:
            raise ValueError(f"{type(model).__name__} has {len(names)} block lists ({', '.join(names)}): depth methods need one")
        return names[0]
    for name in BLOCK_LIST_NAMES:
        if isinstance(getattr(model, name, None), nn.ModuleList):
            return name
    raise ValueError(
        f"{type(model).__name__} has no block list ({' or '.join(BLOCK_LIST_NAMES)} as an nn.ModuleList): "
        "depth methods need a backbone whose blocks run in order"
    )


def block_list(model: nn.Module) -> nn.ModuleList:
    """The model's blocks, in the order they run."""
    return getattr(model, block_list_name(model))


def depth_of(model: nn.Module) -> int:
    return len(block_list(model))


@contextlib.contextmanager
def running_blocks(model: nn.Module, kept: Sequence[int]) -> Iterator[nn.Module]:
    """Run `model` with only the blocks `kept` (shared, not copied) for the duration: the
    cheap way to evaluate many masks, since removed blocks cost nothing."""
    name = block_list_name(model)
    full = getattr(model, name)
    setattr(model, name, nn.ModuleList(full[i] for i in kept))
    try:
        yield model
    finally:
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
    """A standalone copy of `model` with only the blocks `kept`, in order, and a config that
    says so. The source model is untouched."""
    name = block_list_name(model)
    full = getattr(model, name)
    # Copy the model without its blocks, then only the kept blocks: a 28 -> 14 copy of a
    # large model never holds the 14 removed blocks twice.
    setattr(model, name, nn.ModuleList())
    try:
        pruned = copy.deepcopy(model)
    finally:
        setattr(model, name, full)
    setattr(pruned, name, nn.ModuleList(copy.deepcopy(full[i]) for i in kept))
    _set_depth(pruned, len(kept))
    return pruned


def _set_depth(model: nn.Module, depth: int) -> None:
    from ..backbones import backbone

    backbone(model).set_depth(depth)
