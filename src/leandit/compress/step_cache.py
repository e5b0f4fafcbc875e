"""Training-free step caching: reuse each block's residual update across adjacent sampling
steps on a fixed schedule (FORA-style), as a wrapper on the backbone interface.

Adjacent sampling steps see nearly the same hidden states, so most of a block's work is
repeated. `StepCache` counts the model's calls: every `interval`-th call (and the first
`warmup` calls of a trajectory, where the noisiest states change fastest) runs every block and
stores its update `block(x) - x`; the calls in between run only the embedders and the final
layer and add the stored updates, `x + delta`. The cache sits on whatever runs at each block
position (a depth-pruned model's kept blocks, DyDiT's dynamic blocks, DiffCR's routed blocks),
so it composes with every compression method; interval 1 is the model itself, exactly.

A trajectory starts with `reset()` (`generate` and `bench --trajectory` call it before each
run); a call whose batch differs from the stored updates' runs in full.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..backbones import backbone
from ..models.blocks import block_list
from ..models.wrappers import WrapperType, register_wrapper


@dataclass(frozen=True)
class CacheSettings:
    """interval: a full call every `interval` calls (1 = no caching); warmup: the first calls
    of a trajectory that always run in full."""

    interval: int = 2
    warmup: int = 1

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"the cache interval must be at least 1 (1 = no caching), got {self.interval}")
        if self.warmup < 0:
            raise ValueError(f"the cache warm-up must be 0 or more calls, got {self.warmup}")

    def is_full(self, call: int) -> bool:
        return call < self.warmup or (call - self.warmup) % self.interval == 0

    def record(self) -> dict[str, Any]:
        return asdict(self)


class StepCache(nn.Module):
    """`model` whose block updates are reused between full calls (see the module)."""

    # Its cost per call depends on the call's place in the schedule: bench times trajectories.
    varies_with_timestep = True

    def __init__(self, model: nn.Module, settings: CacheSettings = CacheSettings()):
        super().__init__()
        adapter = backbone(model)
        if adapter.spec.objective == "masked":
            raise ValueError("step caching applies to DiT/SiT/diffusers models; MAR's loop changes its token count every "
                             "iteration, so there is nothing to reuse")
        self.inner = model
        self.settings = settings
        self.output_inputs: Sequence[int | str] | None = adapter.block_output_inputs
        self._blocks = list(block_list(model))
        for index, block in enumerate(self._blocks):
            block.forward = _CachedForward(self, index, block)
        self.mac_log: list[float] | None = None  # bench's trajectory MAC count, when set
        self.reset()

    def reset(self) -> None:
        """Start a new trajectory: the next call runs in full."""
        self._calls = 0
        self._updates: list[Any] = [None] * len(self._blocks)
        self._full = True
        self.full_calls = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._full = self.settings.is_full(self._calls)
        self.full_calls += int(self._full)
        try:
            if self.mac_log is None:
                return self.inner(*args, **kwargs)
            return self._counted(args, kwargs)
        finally:
            self._calls += 1

    def _counted(self, args: tuple, kwargs: dict) -> Any:
        """The call, with the MACs that really ran appended to `mac_log` (reused blocks cost
        nothing; routed and dynamic blocks count what they ran)."""
        from torch.utils.flop_counter import FlopCounterMode

        from ..models.flops import _register_cpu_attention

        _register_cpu_attention()
        counter = FlopCounterMode(display=False)
        with counter:
            out = self.inner(*args, **kwargs)
        self.mac_log.append(counter.get_total_flops() / 2)
        return out

    def remove_hooks(self) -> nn.Module:
        """The model without the cache."""
        for block in self._blocks:
            if isinstance(block.__dict__.get("forward"), _CachedForward):
                del block.forward
        self._blocks = []
        return self.inner

    def _run(self, index: int, block: nn.Module, args: tuple, kwargs: dict) -> Any:
        inputs = self._inputs(args, kwargs)
        stored = self._updates[index]
        if not self._full and stored is not None and all(s.shape == x.shape for s, x in zip(stored, inputs)):
            outputs = [x + s.to(x.dtype) for x, s in zip(inputs, stored)]
            return outputs[0] if self.output_inputs is None else tuple(outputs)
        output = type(block).forward(block, *args, **kwargs)
        outputs = [output] if self.output_inputs is None else list(output)
        self._updates[index] = [(out - x).detach() for out, x in zip(outputs, inputs)]
        return output

    def _inputs(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The block inputs its outputs replace (the hidden states; SD3-style blocks: two)."""
        wheres = (0,) if self.output_inputs is None else self.output_inputs
        found = []
        for where in wheres:
            if isinstance(where, str):
                found.append(kwargs[where])
            else:
                found.append(args[where] if where < len(args) else kwargs["hidden_states"])
        return found


class _CachedForward:
    """The cached `forward` of one block (picklable and deep-copyable, like the gates')."""

    def __init__(self, owner: StepCache, index: int, block: nn.Module):
        self.owner, self.index, self.block = owner, index, block

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.owner._run(self.index, self.block, args, kwargs)


def reset_step_caches(model: nn.Module) -> None:
    """Start a new trajectory in every step cache of `model` (none: nothing happens)."""
    for module in model.modules():
        if isinstance(module, StepCache):
            module.reset()


register_wrapper(WrapperType(
    name="step-cache", cls=StepCache, inner=lambda w: w.inner, state=lambda w: ({}, w.settings.record()),
    build=lambda inner, tensors, table: StepCache(inner, CacheSettings(**table)),
))
