"""Scaled dot-product attention, the one call every leandit attention goes through.

On a CPU, PyTorch's kernels for bf16/fp16 attention (the flash forward and above all its
backward) are slower than its float32 one at every DiT shape measured (2-core AMD EPYC with
native bf16, forward + backward: 4.9x slower at 128 x 3 heads x 16 tokens, 1.7x at
32 x 6 x 64, 1.2x at 32 x 16 x 256), while the linear layers around them run 5x faster in
bf16. So half-precision inputs on a CPU attend in float32 (the more accurate of the two) and
return in their own dtype; on GPUs and in float32 this is `F.scaled_dot_product_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_HALF = (torch.bfloat16, torch.float16)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh) + mask) v over (N, H, T, Dh) inputs, in q's dtype."""
    if q.device.type != "cpu" or q.dtype not in _HALF:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.float()
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask, dropout_p=dropout_p)
    return out.to(q.dtype)
