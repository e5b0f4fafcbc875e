"""The DiT network (Peebles & Xie, 2023), which SiT reuses unchanged with another objective.

The parameter names follow the original release (`x_embedder.proj`, `blocks.{i}.attn.qkv`,
`blocks.{i}.adaLN_modulation.1`, ...) so that its checkpoints load as they are.

Built for being wrapped, never copied:
- `DiT.blocks` is a plain ModuleList of `DiTBlock`s called as `block(x, c)`; a compression
  method replaces entries or the whole list (gating, routing, pruning).
- `DiTBlock` is split into `modulation`, `attention_branch` and `mlp_branch`; `forward` takes
  optional per-sample head and MLP-channel masks. A block has no positional input (positions
  are added once before the first block), so it can run on any subset or reordering of the
  tokens: gather, call the block, scatter back.
- adaLN-Zero: at initialisation every block's gates are zero, so each block is exactly the
  identity. A gated-off block (`m * block(x) + (1 - m) * x` with m = 0) is therefore what a
  freshly initialised block does, and removing a block is the same as gating it off.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .attention import attention
from .config import DiTConfig
from .guidance import classifier_free_guidance


def timestep_embedding(
    t: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [cos(t f_i), sin(t f_i)].

    Frequencies f_i = max_period^(-i / (dim/2 - freq_shift)), i = 0 .. dim/2 - 1. The original
    DiT has no shift; diffusers' DiT uses a shift of 1 (`downscale_freq_shift`), which is why
    its outputs are not bit-exact with the original's for the same weights.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)  # (half,)
    freqs = torch.exp(exponent / (half - freq_shift))  # (half,); shift 0: the same bits as / half
    args = t[:, None].float() * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # (N, dim)
    return emb


def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (MAE style): half the channels encode the row,
    half the column, each as [sin, cos] of the position times 1/10000^(2i/d)."""
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for the 2-D position embedding")

    def one_axis(positions: np.ndarray, d: int) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))  # (d/2,)
        angles = np.einsum("m,d->md", positions.reshape(-1), omega)  # (M, d/2)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # (M, d)

    coords = np.arange(grid_size, dtype=np.float32)
    # Token k = row * grid + col; the first half encodes the column (the first meshgrid output
    # in "xy" indexing), the second half the row.
    cols, rows = np.meshgrid(coords, coords)  # each (grid, grid)
    return np.concatenate([one_axis(cols, dim // 2), one_axis(rows, dim // 2)], axis=1)  # (T, dim)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # (N, T, D)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, one Conv2d."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t (frequency shift `freq_shift`, see `timestep_embedding`) -> MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: float = 0.0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if self.freq_shift:  # a diffusers DiT's features
            freq = timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift)  # (N, 256)
        else:  # the original's call, unchanged (tests substitute the function with this signature)
            freq = timestep_embedding(t, self.frequency_embedding_size)  # (N, 256)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class label -> vector. Row `num_classes` is the null class of classifier-free guidance.

    Unlike the original, this module never drops labels itself: dropping is part of the
    training objective, so that a student and its teacher can see the same dropped labels.
    """

    def __init__(self, num_classes: int, hidden_size: int, has_null_class: bool):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + int(has_null_class), hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)  # (N, D)


class Attention(nn.Module):
    """Multi-head self-attention; `head_mask` scales each head's output before `proj`."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, head_mask: torch.Tensor | None = None) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim)  # (N, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H, T, Dh)
        out = attention(q, k, v)  # (N, H, T, Dh)
        if head_mask is not None:
            out = out * _per_sample(head_mask, n)[:, :, None, None]  # (N, H, T, Dh)
        out = out.transpose(1, 2).reshape(n, t, self.num_heads * self.head_dim)  # (N, T, H*Dh): D unless heads were removed
        return self.proj(out)  # (N, T, D)


class Mlp(nn.Module):
    """fc1 -> GELU (tanh) -> fc2; `channel_mask` scales the hidden channels."""

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor, channel_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.act(self.fc1(x))  # (N, T, Dm)
        if channel_mask is not None:
            h = h * _per_sample(channel_mask, x.shape[0])[:, None, :]  # (N, T, Dm)
        return self.fc2(h)  # (N, T, D)


def _per_sample(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """A mask given per model (K,) or per sample (N, K) -> (N, K)."""
    return mask.expand(batch, -1) if mask.dim() == 1 else mask


class Modulation(NamedTuple):
    """The six adaLN outputs of a block, each (N, D)."""

    shift_msa: torch.Tensor
    scale_msa: torch.Tensor
    gate_msa: torch.Tensor
    shift_mlp: torch.Tensor
    scale_mlp: torch.Tensor
    gate_mlp: torch.Tensor


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: x + gate * Attn(mod(LN(x))), then x + gate * MLP(mod(LN(x)))."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden: int, mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        # 1e-6 in the original; a diffusers DiT's `norm_eps` (1e-5 by default) for one converted from it.
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(hidden_size, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def modulation(self, c: torch.Tensor) -> Modulation:
        return Modulation(*self.adaLN_modulation(c).chunk(6, dim=1))  # 6 x (N, D)

    def attention_branch(
        self, x: torch.Tensor, mod: Modulation, head_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = modulate(self.norm1(x), mod.shift_msa, mod.scale_msa)  # (N, T, D)
        return mod.gate_msa.unsqueeze(1) * self.attn(h, head_mask)  # (N, T, D)

    def mlp_branch(
        self, x: torch.Tensor, mod: Modulation, channel_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = modulate(self.norm2(x), mod.shift_mlp, mod.scale_mlp)  # (N, T, D)
        return mod.gate_mlp.unsqueeze(1) * self.mlp(h, channel_mask)  # (N, T, D)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        head_mask: torch.Tensor | None = None,
        channel_mask: torch.Tensor | None = None,
        t_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (N, T, D) tokens, c (N, D) conditioning (timestep + label); masks (H,)/(N, H) and
        (Dm,)/(N, Dm). `t_emb` (N, D), the timestep embedding alone, is passed to every block
        for wrappers whose decisions depend on the timestep only (DyDiT widths, DiffCR
        ratios); the plain block does not use it."""
        mod = self.modulation(c)
        x = x + self.attention_branch(x, mod, head_mask)  # (N, T, D)
        return x + self.mlp_branch(x, mod, channel_mask)  # (N, T, D)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (N, D)
        x = modulate(self.norm_final(x), shift, scale)  # (N, T, D)
        return self.linear(x)  # (N, T, p*p*C_out)


class DiT(nn.Module):
    """Diffusion transformer: patchify, add positions, condition on t + y, blocks, unpatchify.

    `forward(x, t, y)` with x (N, C, H, W), t (N,) timesteps (integers for DiT, floats in
    [0, 1] for SiT: the same embedder takes both), y (N,) class ids (`num_classes` = null)
    returns (N, out_channels, H, W).
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        # Provenance, kept with the model and written to its folder: where the weights came
        # from and what was done to them (compression.json), oldest first.
        self.source: str | None = None
        self.compression: list[dict] = []
        d = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, d)
        self.t_embedder = TimestepEmbedder(d, freq_shift=config.time_freq_shift)
        self.y_embedder = LabelEmbedder(config.num_classes, d, config.has_null_class)
        # Fixed sin-cos positions, saved with the weights as in the original release.
        self.register_buffer("pos_embed", torch.zeros(1, config.num_tokens, d))
        self.blocks = nn.ModuleList(
            DiTBlock(d, config.num_heads, config.mlp_hidden, mlp_norm_eps=config.mlp_norm_eps)
            for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(d, config.patch_size, config.out_channels)
        if not _is_meta(self):
            self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT initialisation: Xavier-uniform linears with zero bias, N(0, 0.02) embeddings,
        and adaLN-Zero (modulation and output layers start at zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        grid = int(self.config.num_tokens**0.5)
        pos = sincos_pos_embed_2d(self.config.hidden_size, grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over the flattened patch
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def null_class(self) -> int:
        if not self.config.has_null_class:
            raise ValueError(
                "this model has no null class (class_dropout_prob = 0): it cannot use "
                "classifier-free guidance"
            )
        return self.config.num_classes

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        """Input tokens (N, T, D) with positions added, the conditioning c = t_emb + y_emb
        (N, D), and the timestep embedding t_emb (N, D) alone."""
        tokens = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        t_emb = self.t_embedder(t)  # (N, D)
        return tokens, t_emb + self.y_embedder(y), t_emb

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, c = self.config.patch_size, self.config.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)  # (N, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C, h, p, w, q)
        return x.reshape(x.shape[0], c, h * p, w * p)  # (N, C, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tokens, c, t_emb = self.embed(x, t, y)  # (N, T, D), (N, D), (N, D)
        for block in self.blocks:
            tokens = block(tokens, c, t_emb=t_emb)  # (N, T, D)
        out = self.final_layer(tokens, c)  # (N, T, p*p*C_out)
        return self.unpatchify(out)  # (N, C_out, H, W)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guided_channels: int | None = None,
    ) -> torch.Tensor:
        """Guided prediction for a batch given ONCE (N, C, H, W), unlike the original DiT's, which takes a doubled batch.

        The original `forward_with_cfg` expects x = [x; x] and labels [y; null] and returns 2N
        rows; this one makes the unconditional half itself and returns N rows (see
        `classifier_free_guidance`): a port from the original must pass x and y once.
        `guided_channels` defaults to the config's
        (`guided_channels`: 3 for the original DiT/SiT checkpoints, whose sampler guides 3 of
        their 4 latent channels; otherwise all prediction channels).
        """
        channels = guided_channels or self.config.guided_channels or self.config.in_channels
        return classifier_free_guidance(self, x, t, y, scale=cfg_scale, null_class=self.null_class, channels=channels)


def _is_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())
