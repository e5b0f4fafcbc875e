"""Parameter and FLOP counts of a forward pass, attention included.

Counted with `torch.utils.flop_counter` on a copy of the model on the meta device (no memory,
no arithmetic), so even DiT-XL/2 is counted in well under a second. The DiT paper's
"Gflops" are multiply-accumulates (MACs): DiT-XL/2 at 256px is 118.6 GMACs = 237 GFLOPs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop

_REGISTERED = False


def _register_cpu_attention() -> None:
    """The CPU flash-attention kernel has no FLOP formula in torch: without one, attention
    on real CPU tensors counts as zero. Its arguments match the generic SDPA formula."""
    global _REGISTERED
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if _REGISTERED or op is None:
        return
    try:

        @register_flop_formula(op)
        def _cpu_flash_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop(query_shape, key_shape, value_shape)

    except RuntimeError:  # already registered by a newer torch
        pass
    _REGISTERED = True


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, batch_size: int = 1) -> int:
    """FLOPs (2 per multiply-accumulate) of one forward of a backbone at `batch_size` (text
    models at the adapter's example prompt length)."""
    from ..backbones import backbone, unwrap

    if getattr(unwrap(model), "varies_with_timestep", False):
        raise ValueError("a dynamic model's FLOPs depend on the timestep and the image: count them over a sampling "
                         "trajectory (`leandit bench --trajectory STEPS`), or count its dense backbone")
    _register_cpu_attention()
    meta_model = _meta_copy(model)
    adapter = backbone(meta_model)
    x, t, cond = adapter.example_inputs(batch_size, "meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        adapter.predict(x, t, cond)
    return int(counter.get_total_flops())


def _meta_copy(model: nn.Module) -> nn.Module:
    """The same module structure with meta tensors (a deep copy that allocates nothing)."""
    memo: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)
