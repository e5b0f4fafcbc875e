"""Kept ratios as numbers a block can run: bins, capacities, interpolation, regions, budgets.

A layer's kept ratio r is a free parameter in [1 / bins, 1]. A block can only run on a whole
number of tokens, so r is read between the two nearest bins b_lo <= r <= b_hi of
1.0, 0.9, ..., 0.1 (for 10 bins): the block runs at both bins' capacities
k = ceil(b * N) and the outputs are mixed as (1 - w) * out_lo + w * out_hi with
w = (r - b_lo) / (b_hi - b_lo), which is what makes r differentiable (d out / d r =
(out_hi - out_lo) / bin width). Capacities are computed in integers (k_i = ceil(i * N / bins)
for bin i), so 0.3 * 10 never lands on the wrong side of a bin.
"""

from __future__ import annotations

import math

import torch


def capacity(bin_index: int, bins: int, num_tokens: int) -> int:
    """Tokens a block keeps at bin `bin_index` (1..bins, ratio bin_index / bins): ceil(r * N)."""
    if not 1 <= bin_index <= bins:
        raise ValueError(f"bin {bin_index} is outside 1..{bins}")
    return -(-bin_index * num_tokens // bins)


def bin_pair(ratio: float, bins: int) -> tuple[int, int]:
    """(lower bin, upper bin) indices whose ratios bracket `ratio` in [1 / bins, 1]: adjacent
    bins, so that r = 1.0 (the top) and r = 1 / bins (the bottom) still have a neighbour to
    take a gradient from; a ratio exactly on an inner bin is that pair's lower end."""
    position = min(max(ratio * bins, 1.0), float(bins))  # in [1, bins]
    lower = min(int(math.floor(position + 1e-9)), bins - 1)  # 1e-9: 0.3 * 10 = 2.9999999999999996
    return lower, lower + 1


def interpolation_weight(ratio: torch.Tensor, lower: int, bins: int) -> torch.Tensor:
    """w of the upper bin for `ratio` (a differentiable scalar) between bins lower and lower + 1."""
    return ratio * bins - lower


def nearest_bin(ratio: float, bins: int) -> int:
    """The bin a trained ratio freezes to: the nearest one (halves go up: fewer skipped tokens;
    1e-5 so that a float32 ratio such as 0.45 = 0.449999988 counts as a half)."""
    return min(max(int(math.floor(ratio * bins + 0.5 + 1e-5)), 1), bins)


def clamp_ratios(ratios: torch.Tensor, bins: int) -> torch.Tensor:
    """Ratios held in [1 / bins, 1] for the forward, with the gradient of the unclamped value, so
    a ratio pushed against a bound is not stuck there (the job also projects the parameter back
    into range after every step)."""
    return ratios + (ratios.clamp(1.0 / bins, 1.0) - ratios).detach()


def regions_of(t: torch.Tensor, regions: int, objective: str, num_timesteps: int = 1000) -> torch.Tensor:
    """The timestep region (N,) of each t: region g covers t in [g, g + 1) * span, with
    span = num_timesteps / regions for diffusion (integer t; region 0 = the least noisy) and
    1 / regions for flow (t in [0, 1]; t = 1 is the data, so region 0 is the noisiest)."""
    if regions == 1:
        return torch.zeros(t.shape[0], dtype=torch.long, device=t.device)
    if objective == "flow":
        return (t.double() * regions).floor().long().clamp(0, regions - 1)
    return (t.long() * regions // num_timesteps).clamp(0, regions - 1)


def ratio_budget_loss(ratios: torch.Tensor, target: float) -> torch.Tensor:
    """The paper's budget: (mean kept ratio over layers and regions - (1 - target))^2, with
    target the fraction of token computation to remove."""
    return (ratios.mean() - (1.0 - target)) ** 2


def mac_budget_loss(mac_ratio: torch.Tensor, target: float) -> torch.Tensor:
    """The MAC-weighted budget: (routed / dense MACs, averaged over regions - (1 - target))^2."""
    return (mac_ratio - (1.0 - target)) ** 2
