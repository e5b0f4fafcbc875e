"""Learnable N:M depth gates, put on a backbone without changing it.

`DepthGates` holds one categorical distribution per group of a `Scheme` (a logit per
candidate mask) and draws per-image layer masks with the straight-through Gumbel-softmax:
hard one-hot forward, soft backward. `GatedModel` installs a forward hook on every block of
the backbone that mixes the block's output with its input,

    out = x + m * (block(x) - x)      (= m * block(x) + (1 - m) * x),

with m the image's 0/1 gate for that block. Every block runs for every image, because the
gate's gradient is <dL/dout, block(x) - x>. But for an image whose gate is 0 the block's
weights and input get m * (...) = exactly 0 through the block: with `skip_dropped` those
images' block forward runs without building its graph (the batch is split per block into
kept and dropped rows, and joined again), so the backward only runs over the kept ones. The
gradients are the same numbers (up to the rounding of a smaller matmul); blocks with active
dropout are never split (the split would change their random draws).

The gating replaces each block's `forward` by an instance attribute: the backbone's modules,
parameter names and state dict stay exactly as they were, and `GatedModel.remove_hooks()`
returns it untouched.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...models.blocks import block_list
from .scheme import Scheme

# Uniform noise is clamped away from 0 and 1 so that -log(-log(u)) stays finite.
_EPS = 1e-10


class DepthGates(nn.Module):
    """Per-group logits over the candidate masks of `scheme`.

    Args:
        scheme: the N:M groups.
        logit_init: the starting value of every logit (uniform distribution; the reference
            starts at 0.02).
        logit_scale: logits are multiplied by this before the softmax (reference 100): with
            a logit learning rate of 1e-3 it sets how fast a distribution can become sharp.
    """

    def __init__(self, scheme: Scheme, logit_init: float = 0.02, logit_scale: float = 100.0):
        super().__init__()
        self.scheme = scheme
        self.logit_scale = float(logit_scale)
        sizes = [g.num_candidates for g in scheme.groups]
        self.slices = []
        start = 0
        for size in sizes:
            self.slices.append(slice(start, start + size))
            start += size
        self.logits = nn.Parameter(torch.full((start,), float(logit_init)))
        # Candidate r of group g, written over the whole depth: one-hot choices (N, C_total)
        # times this (C_total, L) matrix give the per-image layer masks (N, L).
        layout = torch.zeros(start, scheme.depth)
        for group, sl in zip(scheme.groups, self.slices):
            layout[sl, group.start : group.start + group.m] = group.candidates()
        self.register_buffer("layout", layout, persistent=False)

    @property
    def num_candidates(self) -> int:
        return self.logits.numel()

    def group_probabilities(self) -> list[torch.Tensor]:
        """Softmax over each group's candidates (of the scaled logits)."""
        scaled = self.logits.detach().float() * self.logit_scale
        return [F.softmax(scaled[sl], dim=0) for sl in self.slices]

    def layer_probabilities(self) -> torch.Tensor:
        """(L,) probability that each block is kept under the current distribution."""
        return torch.cat(self.group_probabilities()) @ self.layout

    def choices(self) -> list[int]:
        """The most likely candidate of each group."""
        return [int(p.argmax()) for p in self.group_probabilities()]

    def confidences(self) -> list[float]:
        """The probability of each group's most likely candidate (1 = decided)."""
        return [float(p.max()) for p in self.group_probabilities()]

    def decision_mask(self) -> torch.Tensor:
        """(L,) 0/1 mask of the most likely candidates."""
        return self.scheme.mask_from_choices(self.choices())

    def sample(self, uniform: torch.Tensor, temperature: float) -> torch.Tensor:
        """Per-image layer masks (N, L), exactly 0/1 forward, differentiable backward.

        `uniform` (N, C_total) in [0, 1) is the randomness (one independent Gumbel sample per
        image and group): passing it in keeps the draw reproducible and equal across DDP ranks.
        """
        if uniform.shape[-1] != self.num_candidates:
            raise ValueError(f"gate noise needs {self.num_candidates} values per image, got {uniform.shape[-1]}")
        dtype = torch.promote_types(self.logits.dtype, torch.float32)  # float32 even under bf16
        gumbel = -torch.log(-torch.log(uniform.to(dtype).clamp(_EPS, 1 - _EPS)))  # (N, C)
        scaled = self.logits.to(dtype) * self.logit_scale  # (C,)
        parts = []
        for sl in self.slices:
            soft = F.softmax((scaled[sl] + gumbel[:, sl]) / temperature, dim=-1)  # (N, C_g)
            hard = F.one_hot(soft.argmax(dim=-1), soft.shape[-1]).to(soft.dtype)  # (N, C_g)
            parts.append(hard - soft.detach() + soft)  # value of hard, gradient of soft
        return torch.cat(parts, dim=-1) @ self.layout.to(dtype)  # (N, L)


class GatedModel(nn.Module):
    """A backbone whose blocks are gated by `DepthGates`; everything trainable in one module
    (so the training loop's DDP, EMA and checkpoints cover the gates too).

    `forward(*args, gate_noise=U, **kwargs)` draws masks from U (N, C_total) at the current
    `temperature` and runs the backbone with them; `gate_masks=M` runs given masks (L,) or
    (N, L); with neither it runs the most likely mask (still every block, gated), which is
    what the decision would keep.

    Args:
        output_inputs: for blocks that return a tuple, which input each output element
            replaces (a positional index or a keyword name per element), e.g. SD3/Flux blocks
            returning (encoder_hidden_states, hidden_states) take ("encoder_hidden_states",
            "hidden_states"). None: the block returns one tensor that replaces its first input.
    """

    def __init__(self, backbone: nn.Module, gates: DepthGates, output_inputs: Sequence[int | str] | None = None,
                 skip_dropped: bool = False):
        super().__init__()
        blocks = block_list(backbone)
        if len(blocks) != gates.scheme.depth:
            raise ValueError(f"scheme {gates.scheme} covers {gates.scheme.depth} blocks but the model has {len(blocks)}")
        self.backbone = backbone
        self.gates = gates
        self.temperature = 1.0
        self.output_inputs = tuple(output_inputs) if output_inputs is not None else None
        self.skip_dropped = skip_dropped
        self._masks: torch.Tensor | None = None
        self._rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] | None = None
        self._blocks = list(blocks)
        for index, block in enumerate(self._blocks):
            block.forward = _GatedForward(self, index, block)

    def forward(
        self, *args: Any, gate_noise: torch.Tensor | None = None, gate_masks: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        batch = _batch_size(args, kwargs)
        if gate_noise is not None:
            self._masks = self.gates.sample(gate_noise, self.temperature)  # (N, L)
        elif gate_masks is not None:  # given masks (L,) or (N, L), 0/1 or soft
            self._masks = gate_masks.expand(batch, -1) if gate_masks.dim() == 1 else gate_masks
        else:
            self._masks = self.gates.decision_mask().to(self.gates.logits.device).expand(batch, -1)
        self._rows = self._split_rows(self._masks) if self.skip_dropped and torch.is_grad_enabled() else None
        try:
            return self.backbone(*args, **kwargs)
        finally:
            self._masks = None
            self._rows = None

    def remove_hooks(self) -> nn.Module:
        """Take the gates off; returns the backbone as it was (plus any adapters added)."""
        for block in self._blocks:
            if isinstance(block.__dict__.get("forward"), _GatedForward):
                del block.forward
        self._blocks = []
        return self.backbone

    @staticmethod
    def _split_rows(masks: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        """Per block (kept rows, dropped rows, the permutation back) where some gate is 0 and
        some is not; None where nothing is to be split. One host read for the whole step."""
        dropped = (masks.detach() == 0).cpu()  # (N, L)
        rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = []
        for column in dropped.T:
            if not column.any():
                rows.append(None)
                continue
            keep, drop = (~column).nonzero().flatten(), column.nonzero().flatten()
            back = torch.empty(len(column), dtype=torch.long)
            back[torch.cat([keep, drop])] = torch.arange(len(column))
            rows.append(tuple(r.to(masks.device, non_blocking=True) for r in (keep, drop, back)))
        return rows

    def _run(self, index: int, block: nn.Module, args: tuple, kwargs: dict) -> Any:
        def call(a: tuple, k: dict) -> Any:
            return type(block).forward(block, *a, **k)

        if self._masks is None:
            return call(args, kwargs)  # called outside GatedModel.forward (e.g. the backbone alone)
        rows = self._rows[index] if self._rows is not None else None
        if rows is None or _has_active_dropout(block):
            output = call(args, kwargs)
        else:
            keep, drop, back = rows
            n = self._masks.shape[0]
            with torch.no_grad():  # gate 0: the gate needs block(x), nothing needs its graph
                dropped = call(*_take_rows((args, kwargs), drop, n))
            if len(keep):
                kept = call(*_take_rows((args, kwargs), keep, n))
                output = _join_rows(kept, dropped, back)
            else:
                output = _tie_to_parameters(dropped, block)
        gate = self._masks[:, index]  # (N,)
        if self.output_inputs is None:
            return _gate(output, _input(args, kwargs, 0), gate)
        return tuple(
            _gate(out, _input(args, kwargs, where), gate) for out, where in zip(output, self.output_inputs)
        )


class _GatedForward:
    """The gated `forward` of one block: picklable and deep-copyable (the EMA copy of a
    GatedModel gets forwards that point at the copy)."""

    def __init__(self, owner: GatedModel, index: int, block: nn.Module):
        self.owner, self.index, self.block = owner, index, block

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.owner._run(self.index, self.block, args, kwargs)


# Block inputs that are not per image even when their first size happens to equal the batch
# (rotary tables of SD3/Flux-style blocks are (tokens, dim)).
_UNBATCHED_INPUTS = frozenset({"image_rotary_emb", "rotary_emb", "freqs_cis"})


def _take_rows(value: Any, rows: torch.Tensor, n: int, name: str | None = None) -> Any:
    """`value` with every per-image tensor (first size n) restricted to `rows`."""
    if name in _UNBATCHED_INPUTS:
        return value
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows) if value.dim() > 0 and value.shape[0] == n else value
    if isinstance(value, dict):
        return {k: _take_rows(v, rows, n, k) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_take_rows(v, rows, n) for v in value)
    return value


def _join_rows(kept: Any, dropped: Any, back: torch.Tensor) -> Any:
    if isinstance(kept, torch.Tensor):
        return torch.cat([kept, dropped]).index_select(0, back)
    return type(kept)(_join_rows(k, d, back) for k, d in zip(kept, dropped))


def _tie_to_parameters(output: Any, block: nn.Module) -> Any:
    """`output` + 0 that depends on every trainable parameter of `block`: a block no image
    kept still gets (zero) gradients, as without the split, so AdamW's moments and step count
    and DDP's gradient reduction see the same parameters either way."""
    trainable = [p for p in block.parameters() if p.requires_grad]
    if not trainable:
        return output
    zero = torch.stack([p.reshape(-1)[0] for p in trainable]).sum() * 0
    if isinstance(output, torch.Tensor):
        return output + zero.to(output.dtype)
    return type(output)((output[0] + zero.to(output[0].dtype), *output[1:]))


def _has_active_dropout(block: nn.Module) -> bool:
    return block.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in block.modules())


def _gate(out: torch.Tensor, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    m = gate.to(out.dtype).reshape(-1, *([1] * (out.dim() - 1)))  # (N, 1, ...)
    return x + m * (out - x)


def _input(args: tuple, kwargs: dict, where: int | str) -> torch.Tensor:
    if isinstance(where, str):
        if where in kwargs:
            return kwargs[where]
        raise ValueError(f"the gated block was called without the keyword input {where!r}")
    if where < len(args):
        return args[where]
    if where == 0 and "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise ValueError(f"the gated block was called without positional input {where}")


def _batch_size(args: tuple, kwargs: dict) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("cannot tell the batch size of the inputs")
