"""The MAR network (Li et al. 2024): an MAE encoder/decoder of ViT blocks over latent tokens
and a per-token diffusion-loss MLP head.

The parameter names follow the original release (`encoder_blocks.{i}.attn.qkv`,
`diffloss.net.res_blocks.{j}.adaLN_modulation.1`, ...) so that its checkpoints load as they
are.

Built for being wrapped, never copied:
- `MAR.encoder_blocks` and `MAR.decoder_blocks` are plain ModuleLists of `ViTBlock`s called
  as `block(x)`: depth methods see them as one ordered list, encoder first.
- `context(tokens, mask, labels)` runs encoder and decoder: the per-token conditioning z of
  the head. `head(x, t, z)` is one denoising call of the head. `forward(inputs, t, labels)`
  is both, for the tokens a training step asks about (`leandit.diffusion.masked`).
- Tokens are (N, L, C) with L = (input_size / patch_size)^2; a mask is (N, L) bool with True
  = unknown (dropped before the encoder, a mask token before the decoder). Every image of a
  batch has the same number of unknown tokens (training draws one ratio per batch and
  generation unmasks in lockstep), so the encoder's input stays a dense (N, T, D) tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import attention
from .dit import TimestepEmbedder
from .mar_config import MARConfig


class ViTAttention(nn.Module):
    """Multi-head self-attention with qkv bias (timm's `Attention`, no q/k norm)."""

    def __init__(self, dim: int, num_heads: int, attn_dropout: float = 0.0, proj_dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim)  # (N, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H, T, Dh)
        out = attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(n, t, d)  # (N, T, D)
        return self.proj_drop(self.proj(out))


class ViTMlp(nn.Module):
    """fc1 -> exact GELU -> dropout -> fc2 -> dropout (timm's `Mlp`)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class ViTBlock(nn.Module):
    """Pre-norm ViT block (LayerNorm eps 1e-6): x + Attn(LN(x)), then x + MLP(LN(x)).

    It has no positional or conditioning input, so it runs on any subset of the tokens and a
    gated-off block (`x + m (block(x) - x)`, m = 0) is exactly a removed one."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attn_dropout: float = 0.0, proj_dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ViTAttention(dim, num_heads, attn_dropout, proj_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ViTMlp(dim, int(dim * mlp_ratio), proj_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # (N, T, D)
        return x + self.mlp(self.norm2(x))  # (N, T, D)


class HeadBlock(nn.Module):
    """Residual MLP block of the head, modulated per token: x + g * MLP(LN(x) (1 + s) + b)."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)  # 3 x (M, W)
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)  # (M, W)


class HeadFinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)  # 2 x (M, W)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)  # (M, C_out)


class DenoisingMLP(nn.Module):
    """The head's network: x_t (M, C), timesteps t (M,), condition z (M, D_dec) -> epsilon and
    the learned-variance values (M, 2C). Every row is one token, independent of the others."""

    def __init__(self, token_dim: int, z_dim: int, width: int, depth: int):
        super().__init__()
        self.in_channels = token_dim
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.res_blocks = nn.ModuleList(HeadBlock(width) for _ in range(depth))
        self.final_layer = HeadFinalLayer(width, 2 * token_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = self.input_proj(x)  # (M, W)
        y = self.time_embed(t) + self.cond_embed(z)  # (M, W)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)  # (M, 2C)


class DiffusionHead(nn.Module):
    """Holds the head's network under `net`, as the release names it (`diffloss.net.*`)."""

    def __init__(self, token_dim: int, z_dim: int, width: int, depth: int):
        super().__init__()
        self.net = DenoisingMLP(token_dim, z_dim, width, depth)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, z)


class MAR(nn.Module):
    """Masked autoregressive model with a diffusion-loss head.

    `forward(inputs, t, labels)`: `inputs` a `leandit.diffusion.masked.MaskedTokens` (tokens
    (N, L, C), mask (N, L), the head rows' token index (N, M) and noisy values (N, M, C)),
    t (N, M) the head timesteps, labels (N,) (`num_classes` = unconditional) -> (N, M, 2C).
    """

    def __init__(self, config: MARConfig):
        super().__init__()
        self.config = config
        self.source: str | None = None
        self.compression: list[dict] = []
        c = config
        d, dd, length = c.hidden_size, c.decoder_hidden_size, c.num_tokens + c.buffer_size
        self.class_emb = nn.Embedding(c.num_classes, d)
        self.fake_latent = nn.Parameter(torch.zeros(1, d))  # the "no class" embedding
        self.z_proj = nn.Linear(c.token_dim, d)
        self.z_proj_ln = nn.LayerNorm(d, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, length, d))
        self.encoder_blocks = nn.ModuleList(
            ViTBlock(d, c.encoder_heads, c.mlp_ratio, c.attn_dropout, c.proj_dropout) for _ in range(c.encoder_depth))
        self.encoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, length, dd))
        self.decoder_blocks = nn.ModuleList(
            ViTBlock(dd, c.decoder_heads, c.mlp_ratio, c.attn_dropout, c.proj_dropout) for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, c.num_tokens, dd))
        self.diffloss = DiffusionHead(c.token_dim, dd, c.head_width, c.head_depth)
        if not any(p.is_meta for p in self.parameters()):
            self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAR's initialisation: N(0, 0.02) embeddings and tokens, Xavier-uniform linears with
        zero bias; the head's modulations and output layer start at zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        net = self.diffloss.net
        nn.init.normal_(net.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(net.time_embed.mlp[2].weight, std=0.02)
        for block in net.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (net.final_layer.adaLN_modulation[-1], net.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def class_embedding(self, labels: torch.Tensor) -> torch.Tensor:
        """(N,) labels -> (N, D); label `num_classes` gets the fake latent."""
        table = torch.cat([self.class_emb.weight, self.fake_latent.to(self.class_emb.weight.dtype)])  # (K + 1, D)
        return table[labels]

    def encode(self, tokens: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Known tokens (N, L, C), mask (N, L) -> encoder output over buffer + known (N, B + K, D)."""
        n, length, _ = tokens.shape
        b = self.config.buffer_size
        x = self.z_proj(tokens)  # (N, L, D)
        buffer = self.class_embedding(labels).to(x.dtype).unsqueeze(1).expand(n, b, x.shape[-1])  # (N, B, D)
        x = self.z_proj_ln(torch.cat([buffer, x], dim=1) + self.encoder_pos_embed_learned)  # (N, B + L, D)
        keep = torch.cat([mask.new_zeros(n, b), mask], dim=1).logical_not()  # (N, B + L)
        x = x[keep].reshape(n, -1, x.shape[-1])  # (N, B + K, D): every image keeps as many
        for block in self.encoder_blocks:
            x = block(x)
        return self.encoder_norm(x)

    def decode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder output (N, B + K, D), mask (N, L) -> the head's condition per token (N, L, D_dec)."""
        n = x.shape[0]
        b = self.config.buffer_size
        x = self.decoder_embed(x)  # (N, B + K, Dd)
        keep = torch.cat([mask.new_zeros(n, b), mask], dim=1).logical_not()  # (N, B + L)
        full = self.mask_token.to(x.dtype).expand(n, keep.shape[1], x.shape[-1]).clone()  # (N, B + L, Dd)
        full[keep] = x.reshape(-1, x.shape[-1])
        x = full + self.decoder_pos_embed_learned
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        return x[:, b:] + self.diffusion_pos_embed_learned  # (N, L, Dd)

    def context(self, tokens: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Encoder + decoder: the head's condition z for every token position (N, L, D_dec)."""
        return self.decode(self.encode(tokens, mask, labels), mask)

    def head(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """One head call on rows: x_t (M, C), t (M,), z (M, D_dec) -> (M, 2C)."""
        return self.diffloss(x, t, z)

    def forward(self, inputs, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = self.context(inputs.tokens, inputs.mask, labels)  # (N, L, Dd)
        n, m = inputs.index.shape
        rows = z.gather(1, inputs.index.unsqueeze(-1).expand(n, m, z.shape[-1]))  # (N, M, Dd)
        out = self.head(inputs.noisy.reshape(n * m, -1), t.reshape(n * m), rows.reshape(n * m, -1))  # (N M, 2C)
        return out.reshape(n, m, -1)  # (N, M, 2C)


__all__ = ["MAR", "DiffusionHead", "DenoisingMLP", "ViTBlock"]
