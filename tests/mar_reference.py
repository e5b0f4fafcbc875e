"""An independent, purely functional re-computation of the original MAR forward pass.

Written from the published architecture (Li et al., "Autoregressive Image Generation without
Vector Quantization", 2024) and the facts of its release (models/mar.py, models/diffloss.py
of LTH14/mar), operating directly on the raw tensors of a state dict with the release's key
names. It imports nothing from leandit and avoids the shortcuts the library uses: no
`nn.Module`, no `scaled_dot_product_attention`, no `F.layer_norm`, no boolean-mask indexing
(tokens are dropped and re-inserted by per-image index lists), so that agreeing with it
means the library computes the released network, not merely that it agrees with itself.

The facts it encodes:
- tokens: an (N, C, H, W) latent is cut into p x p patches, row-major over the (H/p, W/p)
  grid; a token lists its values channel first, then the patch's row, then its column.
- encoder: z_proj (linear) of every token; B buffer rows in front whose value is the class
  embedding (class_emb[y], or the learned fake_latent for the "no class" label); the learned
  position embedding over all B + L rows is added, then the z_proj_ln LayerNorm; then the
  rows of unknown tokens are dropped (the buffer always stays), ViT blocks, encoder_norm.
- decoder: decoder_embed (linear), then the B + L rows are rebuilt: mask_token everywhere,
  the kept rows written back in order; the decoder position embedding is added, ViT blocks,
  decoder_norm, the buffer rows are cut off, diffusion_pos_embed_learned is added.
- ViT block (timm's Block, qkv bias, no layer scale): x + proj(attn(LN1 x)), then
  x + fc2(GELU(fc1(LN2 x))) with the exact (erf) GELU; LayerNorm eps 1e-6 everywhere.
- head (SimpleMLPAdaLN): h = input_proj(x_t); y = MLP(freq(t)) + cond_embed(z), the timestep
  MLP being linear -> SiLU -> linear over [cos(t f), sin(t f)] (256 frequencies, max period
  10000); each residual block: shift, scale, gate = linear(SiLU(y)) in that order,
  h + gate * mlp(LN(h) (1 + scale) + shift) with mlp = linear -> SiLU -> linear and an affine
  LayerNorm; the final layer: shift, scale = linear(SiLU(y)), linear(LN(h) (1 + scale) +
  shift) with a LayerNorm without affine; the output is 2C values (epsilon, variance).

Shapes: N batch, L tokens, B buffer rows, C token values, D encoder width, Dd decoder width,
W head width, M head rows.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
StateDict = Mapping[str, Tensor]

LAYER_NORM_EPS = 1e-6
FREQUENCY_EMBEDDING_SIZE = 256
MAX_PERIOD = 10000.0


# ------------------------------------------------------------------------------ primitives

def silu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def gelu_exact(x: Tensor) -> Tensor:
    """x Phi(x): the GELU of timm's ViT MLP (nn.GELU's default, not the tanh approximation)."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """LayerNorm over the last axis written out (biased variance), optionally affine."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + LAYER_NORM_EPS)
    if weight is not None:
        y = y * weight + bias
    return y


def ln(sd: StateDict, prefix: str, x: Tensor) -> Tensor:
    return layer_norm(x, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])


def linear(sd: StateDict, prefix: str, x: Tensor) -> Tensor:
    return x @ sd[f"{prefix}.weight"].t() + sd[f"{prefix}.bias"]


def count(sd: StateDict, prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return len({int(m.group(1)) for k in sd if (m := pattern.match(k))})


# ------------------------------------------------------------------------------ tokens, masks

def patchify(x: Tensor, patch_size: int) -> Tensor:
    """(N, C, H, W) -> (N, L, C p^2), written with explicit loops over the grid: token
    r * (W/p) + c holds x[:, ch, r p + i, c p + j] at position ch p^2 + i p + j."""
    n, channels, h, w = x.shape
    p = patch_size
    rows, cols = h // p, w // p
    out = torch.empty(n, rows * cols, channels * p * p, dtype=x.dtype)
    for r in range(rows):
        for c in range(cols):
            patch = x[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p]  # (N, C, p, p)
            out[:, r * cols + c] = patch.reshape(n, -1)  # channel, then row, then column
    return out


def mask_from_orders(orders: Tensor, num_unknown: int) -> Tensor:
    """MAR's mask: the first `num_unknown` positions of each image's order are unknown.
    orders (N, L) permutations -> (N, L) bool, True = unknown."""
    n, length = orders.shape
    mask = torch.zeros(n, length, dtype=torch.bool)
    for i in range(n):
        for position in orders[i, :num_unknown].tolist():
            mask[i, position] = True
    return mask


# ------------------------------------------------------------------------------ the ViT

def attention(sd: StateDict, prefix: str, x: Tensor, num_heads: int) -> Tensor:
    """softmax(Q K^T / sqrt(Dh)) V per head; the qkv axis is laid out (3, heads, Dh)."""
    n, t, d = x.shape
    dh = d // num_heads
    qkv = linear(sd, f"{prefix}.qkv", x).reshape(n, t, 3, num_heads, dh)
    q = qkv[:, :, 0].permute(0, 2, 1, 3)  # (N, K, T, Dh)
    k = qkv[:, :, 1].permute(0, 2, 1, 3)
    v = qkv[:, :, 2].permute(0, 2, 1, 3)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)  # (N, K, T, T)
    heads = weights @ v  # (N, K, T, Dh)
    return linear(sd, f"{prefix}.proj", heads.permute(0, 2, 1, 3).reshape(n, t, d))


def vit_block(sd: StateDict, prefix: str, x: Tensor, num_heads: int) -> Tensor:
    x = x + attention(sd, f"{prefix}.attn", ln(sd, f"{prefix}.norm1", x), num_heads)
    h = gelu_exact(linear(sd, f"{prefix}.mlp.fc1", ln(sd, f"{prefix}.norm2", x)))
    return x + linear(sd, f"{prefix}.mlp.fc2", h)


def class_embedding(sd: StateDict, labels: Tensor) -> Tensor:
    """(N,) -> (N, D): class_emb rows, the fake latent for label == number of classes."""
    table = sd["class_emb.weight"]
    rows = [sd["fake_latent"][0] if y == table.shape[0] else table[y] for y in labels.tolist()]
    return torch.stack(rows)


def encoder(sd: StateDict, tokens: Tensor, mask: Tensor, labels: Tensor, *, buffer_size: int, num_heads: int) -> Tensor:
    """tokens (N, L, C), mask (N, L) True = unknown -> (N, B + K, D), K known tokens an image."""
    n = tokens.shape[0]
    b = buffer_size
    x = linear(sd, "z_proj", tokens)  # (N, L, D)
    buffer = class_embedding(sd, labels)[:, None, :].expand(n, b, x.shape[-1])  # (N, B, D)
    x = torch.cat([buffer, x], dim=1) + sd["encoder_pos_embed_learned"]
    x = ln(sd, "z_proj_ln", x)
    kept = []
    for i in range(n):  # the buffer rows, then the known tokens in order
        rows = list(range(b)) + [b + j for j in range(mask.shape[1]) if not mask[i, j]]
        kept.append(x[i, rows])
    x = torch.stack(kept)  # (N, B + K, D)
    for i in range(count(sd, "encoder_blocks")):
        x = vit_block(sd, f"encoder_blocks.{i}", x, num_heads)
    return ln(sd, "encoder_norm", x)


def decoder(sd: StateDict, x: Tensor, mask: Tensor, *, buffer_size: int, num_heads: int) -> Tensor:
    """Encoder output (N, B + K, D), mask (N, L) -> the head's condition per token (N, L, Dd)."""
    n, length = mask.shape
    b = buffer_size
    x = linear(sd, "decoder_embed", x)  # (N, B + K, Dd)
    rebuilt = []
    for i in range(n):
        rows = [sd["mask_token"][0, 0]] * (b + length)
        known = list(range(b)) + [b + j for j in range(length) if not mask[i, j]]
        for source, target in enumerate(known):
            rows[target] = x[i, source]
        rebuilt.append(torch.stack(rows))
    x = torch.stack(rebuilt) + sd["decoder_pos_embed_learned"]  # (N, B + L, Dd)
    for i in range(count(sd, "decoder_blocks")):
        x = vit_block(sd, f"decoder_blocks.{i}", x, num_heads)
    x = ln(sd, "decoder_norm", x)
    return x[:, b:] + sd["diffusion_pos_embed_learned"]


# ------------------------------------------------------------------------------ the head

def timestep_frequencies(t: Tensor, dim: int = FREQUENCY_EMBEDDING_SIZE) -> Tensor:
    """[cos(t f_i), sin(t f_i)], f_i = exp(-ln(10000) i / half), i < half = dim / 2."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def head(sd: StateDict, x_t: Tensor, t: Tensor, z: Tensor) -> Tensor:
    """SimpleMLPAdaLN: x_t (M, C), t (M,), z (M, Dd) -> (M, 2C)."""
    p = "diffloss.net"
    h = linear(sd, f"{p}.input_proj", x_t)  # (M, W)
    t_emb = linear(sd, f"{p}.time_embed.mlp.2", silu(linear(sd, f"{p}.time_embed.mlp.0", timestep_frequencies(t))))
    y = t_emb + linear(sd, f"{p}.cond_embed", z)  # (M, W)
    for j in range(count(sd, f"{p}.res_blocks")):
        q = f"{p}.res_blocks.{j}"
        shift, scale, gate = linear(sd, f"{q}.adaLN_modulation.1", silu(y)).chunk(3, dim=-1)
        u = ln(sd, f"{q}.in_ln", h) * (1 + scale) + shift
        h = h + gate * linear(sd, f"{q}.mlp.2", silu(linear(sd, f"{q}.mlp.0", u)))
    shift, scale = linear(sd, f"{p}.final_layer.adaLN_modulation.1", silu(y)).chunk(2, dim=-1)
    return linear(sd, f"{p}.final_layer.linear", layer_norm(h) * (1 + scale) + shift)


def forward(
    sd: StateDict,
    tokens: Tensor,
    mask: Tensor,
    labels: Tensor,
    rows: Sequence[Sequence[int]],
    x_t: Tensor,
    t: Tensor,
    *,
    buffer_size: int,
    encoder_heads: int,
    decoder_heads: int,
) -> Tensor:
    """The training forward: encoder, decoder, then the head on chosen token rows.
    rows[i] the token positions of image i's head rows, x_t (N, M, C), t (N, M) -> (N, M, 2C)."""
    enc = encoder(sd, tokens, mask, labels, buffer_size=buffer_size, num_heads=encoder_heads)
    z = decoder(sd, enc, mask, buffer_size=buffer_size, num_heads=decoder_heads)  # (N, L, Dd)
    out = []
    for i, positions in enumerate(rows):
        out.append(head(sd, x_t[i], t[i], z[i, list(positions)]))
    return torch.stack(out)


# ------------------------------------------------------------------------------ weights

def randomize_parameters_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every floating tensor with random values, in place, non-zero everywhere
    (MAR zero-initialises the head's modulations and output layer: a fresh head outputs 0).
    Matrices N(0, 1/fan_in), vectors N(0, 0.2^2) around their typical value (LayerNorm
    weights around 1), embeddings and tokens N(0, 0.5^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if not tensor.is_floating_point():
                continue
            if name.endswith(("pos_embed_learned", "class_emb.weight", "fake_latent", "mask_token")):
                value = torch.randn(tensor.shape, generator=gen) * 0.5
            elif tensor.dim() >= 2:
                value = torch.randn(tensor.shape, generator=gen) / math.sqrt(tensor[0].numel())
            else:
                value = torch.randn(tensor.shape, generator=gen) * 0.2
                if re.search(r"(norm\d?|_ln|in_ln)\.weight$", name):
                    value = value + 1.0
            tensor.copy_(value)
    return module
