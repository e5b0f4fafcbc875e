"""What a dynamic (DyDiT) model runs: active heads and MLP groups per block over the
timesteps (from its routers: a function of t alone) and the share of tokens each block sends
through its MLP (measured on noised data, as it depends on the image)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..backbones import backbone, cond_slice, cond_to


@dataclass
class WidthProfile:
    timesteps: np.ndarray  # (T,) the trained timesteps
    heads: np.ndarray  # (L, T) active heads per block
    groups: np.ndarray  # (L, T) active MLP groups per block
    num_heads: int
    token_bins: np.ndarray | None = None  # (B + 1,) timestep bin edges
    token_share: np.ndarray | None = None  # (L, B) mean share of tokens through the MLP per bin

    def rows(self) -> list[list]:
        """CSV rows: block, timestep, heads, groups (every trained timestep)."""
        return [[layer, float(t), int(self.heads[layer, i]), int(self.groups[layer, i])]
                for layer in range(self.heads.shape[0]) for i, t in enumerate(self.timesteps)]


def _counts(bitmasks: list[list[int]], width: int) -> np.ndarray:
    masks = np.asarray(bitmasks, dtype=np.int64)
    return sum(((masks >> k) & 1) for k in range(width))


def width_profile(model: nn.Module) -> WidthProfile:
    """Heads and groups per block at every trained timestep of a DyDiT model."""
    outer = backbone(model).outer
    if not getattr(outer, "varies_with_timestep", False):
        raise ValueError("this model is not dynamic (no DyDiT routers): make one with `leandit dynamic`")
    table = outer.width_table()
    return WidthProfile(np.asarray(table["timesteps"], dtype=np.float64), _counts(table["heads"], outer.num_heads),
                        _counts(table["groups"], outer.num_groups), outer.num_heads)


@torch.no_grad()
def measure_token_shares(model: nn.Module, calibration, bins: int = 20, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(bin edges (bins + 1,), mean share of tokens through each block's MLP (L, bins)) over a
    calibration set of noised images spread over the timesteps."""
    adapter = backbone(model)
    outer = adapter.outer
    outer.eval()
    if not outer.settings.tokens:
        raise ValueError("this dynamic model sends every token through the MLP (no token routers)")
    device = next(outer.parameters()).device
    shares, times = [], []
    for start in range(0, len(calibration.xt), batch_size):
        stop = start + batch_size
        t = calibration.t[start:stop].to(device)
        adapter.predict(calibration.xt[start:stop].to(device), t, cond_to(cond_slice(calibration.y, slice(start, stop)), device))
        shares.append(torch.stack([b.kept_tokens for b in outer.dynamic_blocks], dim=1).cpu())  # (n, L)
        times.append(t.double().cpu())
    share = torch.cat(shares).numpy()  # (N, L)
    t = torch.cat(times).numpy()
    top = 1.0 if adapter.spec.objective == "flow" else 1000.0
    edges = np.linspace(0.0, top, bins + 1)
    which = np.clip(np.digitize(t, edges) - 1, 0, bins - 1)
    out = np.full((share.shape[1], bins), np.nan)
    for b in range(bins):
        if (which == b).any():
            out[:, b] = share[which == b].mean(axis=0)
    return edges, out
