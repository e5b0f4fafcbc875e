"""An independent, purely functional re-computation of the DiT forward pass.

Written from the published architecture (Peebles & Xie, "Scalable Diffusion Models with
Transformers", 2023, and the conventions of its released checkpoints), operating directly on
the raw tensors of a state dict with the original key names. It deliberately imports nothing
from leandit and avoids the shortcuts the library uses (no `scaled_dot_product_attention`,
no `nn.LayerNorm`, no einsum unpatchify), so that agreeing with it means the library
computes the published network, not merely that it agrees with itself.

Shapes: N batch, C channels, H x W input, p patch, h x w = H/p x W/p token grid, T = h * w
tokens, D hidden size, K heads, Dh = D / K head width, Dm MLP width.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
StateDict = Mapping[str, Tensor]

LAYER_NORM_EPS = 1e-6
FREQUENCY_EMBEDDING_SIZE = 256
MAX_PERIOD = 10000.0


def silu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation, the activation of every DiT MLP."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def layer_norm(x: Tensor, eps: float = LAYER_NORM_EPS) -> Tensor:
    """LayerNorm over the last axis without a learned affine (biased variance, as torch)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x (N, T, D) scaled and shifted per sample by (N, D) vectors."""
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def linear(sd: StateDict, prefix: str, x: Tensor) -> Tensor:
    return F.linear(x, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])


def timestep_frequencies(t: Tensor, dim: int = FREQUENCY_EMBEDDING_SIZE) -> Tensor:
    """[cos(t f_i), sin(t f_i)] with f_i = exp(-ln(10000) i / half), i < half = dim / 2."""
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32)
    freqs = torch.exp(-math.log(MAX_PERIOD) * i / half)  # (half,)
    args = t.float()[:, None] * freqs[None, :]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # (N, dim)


def conditioning(sd: StateDict, t: Tensor, y: Tensor) -> Tensor:
    """c = MLP(freq(t)) + table[y]: the vector every adaLN layer is computed from. (N, D)"""
    h = linear(sd, "t_embedder.mlp.0", timestep_frequencies(t))
    t_emb = linear(sd, "t_embedder.mlp.2", silu(h))
    return t_emb + sd["y_embedder.embedding_table.weight"][y]


def patchify(sd: StateDict, x: Tensor, patch_size: int) -> Tensor:
    """(N, C, H, W) -> (N, T, D) tokens in row-major grid order, positions added."""
    w, b = sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"]
    feats = F.conv2d(x, w, b, stride=patch_size)  # (N, D, h, w)
    n, d = feats.shape[:2]
    tokens = feats.reshape(n, d, -1).permute(0, 2, 1)  # (N, T, D)
    return tokens + sd["pos_embed"].reshape(1, -1, d)


def attention(
    sd: StateDict, prefix: str, x: Tensor, num_heads: int, head_mask: Tensor | None = None
) -> Tensor:
    """Multi-head self-attention, softmax(Q K^T / sqrt(Dh)) V written out.

    The qkv output axis is laid out as (3, K, Dh): q for all heads, then k, then v (the timm
    layout of the original release). `head_mask` (K,) or (N, K) multiplies each head's output
    before the output projection.
    """
    n, t, d = x.shape
    dh = d // num_heads
    qkv = linear(sd, f"{prefix}.qkv", x).reshape(n, t, 3, num_heads, dh)
    q = qkv[:, :, 0].permute(0, 2, 1, 3)  # (N, K, T, Dh)
    k = qkv[:, :, 1].permute(0, 2, 1, 3)
    v = qkv[:, :, 2].permute(0, 2, 1, 3)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)  # (N, K, T, T)
    heads = torch.softmax(scores, dim=-1) @ v  # (N, K, T, Dh)
    if head_mask is not None:
        mask = head_mask.expand(n, num_heads) if head_mask.dim() == 1 else head_mask
        heads = heads * mask[:, :, None, None]
    merged = heads.permute(0, 2, 1, 3).reshape(n, t, d)  # (N, T, K * Dh)
    return linear(sd, f"{prefix}.proj", merged)


def mlp(sd: StateDict, prefix: str, x: Tensor, channel_mask: Tensor | None = None) -> Tensor:
    """fc1 -> GELU(tanh) -> fc2; `channel_mask` (Dm,) or (N, Dm) multiplies hidden channels."""
    h = gelu_tanh(linear(sd, f"{prefix}.fc1", x))  # (N, T, Dm)
    if channel_mask is not None:
        mask = channel_mask.expand(x.shape[0], -1) if channel_mask.dim() == 1 else channel_mask
        h = h * mask[:, None, :]
    return linear(sd, f"{prefix}.fc2", h)


def block_forward(
    sd: StateDict,
    prefix: str,
    x: Tensor,
    c: Tensor,
    num_heads: int,
    head_mask: Tensor | None = None,
    channel_mask: Tensor | None = None,
) -> Tensor:
    """One adaLN-Zero block; `prefix` is e.g. "blocks.3" (or "" for a block's own state dict)."""
    p = f"{prefix}." if prefix else ""
    mod = linear(sd, f"{p}adaLN_modulation.1", silu(c))  # (N, 6D)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
    h = modulate(layer_norm(x), shift_msa, scale_msa)
    x = x + gate_msa[:, None, :] * attention(sd, f"{p}attn", h, num_heads, head_mask)
    h = modulate(layer_norm(x), shift_mlp, scale_mlp)
    return x + gate_mlp[:, None, :] * mlp(sd, f"{p}mlp", h, channel_mask)


def unpatchify(out: Tensor, patch_size: int) -> Tensor:
    """(N, T, p*p*C) -> (N, C, H, W), each token's vector laid out as (p, p, C)."""
    n, t, width = out.shape
    g = math.isqrt(t)
    p = patch_size
    c = width // (p * p)
    x = out.reshape(n, g, g, p, p, c)  # (N, h, w, p, q, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (N, C, h, p, w, q)
    return x.reshape(n, c, g * p, g * p)


def block_count(sd: StateDict) -> int:
    ids = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    return len(ids)


def reference_dit_forward(
    state_dict: StateDict, x: Tensor, t: Tensor, y: Tensor, *, patch_size: int, num_heads: int
) -> Tensor:
    """The DiT forward pass: x (N, C, H, W), t (N,), y (N,) -> (N, C_out, H, W)."""
    sd = state_dict
    tokens = patchify(sd, x, patch_size)
    c = conditioning(sd, t, y)
    for i in range(block_count(sd)):
        tokens = block_forward(sd, f"blocks.{i}", tokens, c, num_heads)
    shift, scale = linear(sd, "final_layer.adaLN_modulation.1", silu(c)).chunk(2, dim=1)
    out = linear(sd, "final_layer.linear", modulate(layer_norm(tokens), shift, scale))
    return unpatchify(out, patch_size)


def reference_pos_embed(hidden_size: int, grid_size: int) -> Tensor:
    """The fixed 2-D sin-cos positions of DiT (the MAE convention), token by token.

    Token k = row * grid + col. Its first D/2 channels encode the column, the last D/2 the
    row; each half is [sin(pos * omega_i), cos(pos * omega_i)] with omega_i = 1/10000^(2i/d),
    d = D/2 the width of one half, i < d/2. Computed in float64 with explicit loops.
    """
    d = hidden_size // 2
    omega = [1.0 / 10000 ** (2 * i / d) for i in range(d // 2)]

    def one_axis(pos: int) -> list[float]:
        return [math.sin(pos * w) for w in omega] + [math.cos(pos * w) for w in omega]

    rows = []
    for row in range(grid_size):
        for col in range(grid_size):
            rows.append(one_axis(col) + one_axis(row))
    return torch.tensor(rows, dtype=torch.float64)  # (T, D)


Forward = Callable[[Tensor, Tensor, Tensor], Tensor]


def reference_cfg_original(forward: Forward, x: Tensor, t: Tensor, y: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance as the original DiT sampler does it.

    The caller passes a doubled batch: x = [z; z], t = [t; t], y = [labels; null]. Only the
    first 3 output channels are guided (the release's "exact reproducibility" choice); every
    other channel (the 4th latent channel and the learned-variance half) is kept from the
    row's own run, so the conditional half of the returned 2N rows carries conditional values.
    """
    n = x.shape[0] // 2
    z = x[:n]
    out = forward(torch.cat([z, z]), t, y)  # (2N, C_out, H, W)
    eps, rest = out[:, :3], out[:, 3:]
    cond, uncond = eps[:n], eps[n:]
    guided = uncond + scale * (cond - uncond)
    return torch.cat([torch.cat([guided, guided]), rest], dim=1)


def reference_cfg_general(
    forward: Forward, x: Tensor, t: Tensor, y: Tensor, scale: float, *, null_class: int, in_channels: int
) -> Tensor:
    """Classifier-free guidance by its definition, with two separate forward passes:
    uncond + s * (cond - uncond) on all `in_channels` prediction channels; the remaining
    output channels (learned variance) come from the conditional pass. Returns N rows."""
    cond = forward(x, t, y)
    uncond = forward(x, t, torch.full_like(y, null_class))
    guided = uncond[:, :in_channels] + scale * (cond[:, :in_channels] - uncond[:, :in_channels])
    return torch.cat([guided, cond[:, in_channels:]], dim=1)


def randomize_parameters_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter and buffer with random values, in place.

    A freshly initialised DiT has zero adaLN and output layers, so its output is exactly zero
    whatever the rest computes: comparing such a model with a reference proves nothing.
    Matrices get N(0, 1/fan_in) (activations stay O(1), so an absolute tolerance of 1e-5 is
    also a tight relative one), biases N(0, 0.2^2), the label table and positions N(0, 0.5^2).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if not tensor.is_floating_point():
                continue
            if name.endswith("embedding_table.weight") or name.endswith("pos_embed"):
                std = 0.5
            elif tensor.dim() >= 2:
                std = 1.0 / math.sqrt(tensor[0].numel())
            else:
                std = 0.2
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * std)
    return module
