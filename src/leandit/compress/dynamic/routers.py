"""DyDiT's routers and their discrete decisions.

Two kinds of router decide what a block computes:
- width routers (`WidthRouters`): one Linear(hidden -> heads - 1) for the attention heads and
  one for the MLP channel groups, read from the timestep embedding alone, so the width of
  every block is a function of t (the same for every image at that t);
- the token router (`TokenRouter`): Linear(hidden -> hidden/16), ReLU, Linear(-> 1) per
  token of the residual stream after the attention residual, deciding which tokens go
  through the MLP.

Head 0 and group 0 have no router: they always run, so a block never loses its whole
attention or MLP. Biases start high (+15 width, +35 tokens) and weights at zero, so the
untrained routers keep everything and the dense model is the starting point.
"""

from __future__ import annotations

import torch
from torch import nn

WIDTH_BIAS = 15.0
TOKEN_BIAS = 35.0
TEMPERATURE = 5.0


def logistic_noise(uniform: torch.Tensor) -> torch.Tensor:
    """Logistic(0, 1) noise from uniforms in [0, 1): the difference g1 - g2 of two Gumbel(0, 1)
    variables, which is what the Gumbel-sigmoid adds to a logit (one draw instead of two)."""
    u = uniform.clamp(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


def decide(logits: torch.Tensor, training: bool, tau: float = TEMPERATURE, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """0/1 decisions from router logits.

    Training: Gumbel-sigmoid y = sigmoid((logits + g1 - g2) / tau), hard = (y > 0.5), with the
    straight-through estimator: the forward value is exactly the hard 0/1 (so "all on" is
    bit-identical to the dense model), the gradient is that of y. `uniform` supplies the noise
    (same shape as logits, from the training step's randomness); None adds no noise.
    Inference: sigmoid(logits) > 0.5, i.e. logits > 0, no noise, no gradient.
    """
    if not training:
        return (logits > 0).to(logits.dtype)
    noisy = logits if uniform is None else logits + logistic_noise(uniform.to(logits.dtype))
    soft = torch.sigmoid(noisy / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + (soft - soft.detach())  # exactly `hard` in value; d/dlogits of `soft`


def with_always_on(decisions: torch.Tensor) -> torch.Tensor:
    """(..., K-1) decisions -> (..., K) with a constant 1 first (head 0 / group 0)."""
    return torch.cat([torch.ones_like(decisions[..., :1]), decisions], dim=-1)


class WidthRouters(nn.Module):
    """The head router and the MLP-group router of one block, on the timestep embedding."""

    def __init__(self, hidden_size: int, num_heads: int, num_groups: int):
        super().__init__()
        self.heads = nn.Linear(hidden_size, num_heads - 1)
        self.groups = nn.Linear(hidden_size, num_groups - 1)
        for layer in (self.heads, self.groups):
            nn.init.zeros_(layer.weight)
            nn.init.constant_(layer.bias, WIDTH_BIAS)

    def forward(self, t_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head and group logits (N, H-1), (N, G-1) for a timestep embedding (N, D)."""
        return self.heads(t_emb), self.groups(t_emb)


class TokenRouter(nn.Module):
    """Which tokens go through the MLP: a logit per token of x (N, T, D) -> (N, T)."""

    def __init__(self, hidden_size: int, reduction: int = 16):
        super().__init__()
        inner = max(1, hidden_size // reduction)
        self.net = nn.Sequential(nn.Linear(hidden_size, inner), nn.ReLU(), nn.Linear(inner, 1))
        nn.init.zeros_(self.net[2].weight)
        nn.init.constant_(self.net[2].bias, TOKEN_BIAS)

    @property
    def inner_size(self) -> int:
        return self.net[0].out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)  # (N, T)
