"""Massive activations: the distribution of every block's output hidden state over a
calibration set (TinyFusion Figure 8), to choose the outlier threshold k of masked RepKD.

Two passes over the same fixed calibration set: the first finds each layer's range and
moments, the second fills a histogram over that range and counts, per sample, the share of
activations more than k standard deviations from the sample's mean (what the RepKD mask with
that k would drop).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..compress.depth.calibration import CalibrationSet, block_inputs_outputs
from ..models.blocks import depth_of


@dataclass
class LayerActivations:
    """Statistics of one block's output over the calibration set.

    `max_sigma` is the largest |x - mean| / std of any activation, with mean and std of its
    own sample (the scale the RepKD mask thresholds); `beyond[k]` the share of activations
    past k of those standard deviations; `counts` over `edges` the histogram."""

    layer: int
    min: float
    max: float
    mean: float
    std: float
    max_sigma: float = 0.0
    beyond: dict[float, float] = field(default_factory=dict)
    counts: np.ndarray | None = None
    edges: np.ndarray | None = None

    def summary(self) -> dict:
        return {
            "layer": self.layer, "min": self.min, "max": self.max, "mean": self.mean, "std": self.std,
            "max_sigma": self.max_sigma, "beyond": {str(k): v for k, v in self.beyond.items()},
        }


def activation_statistics(
    model: torch.nn.Module,
    calibration: CalibrationSet,
    ks: Sequence[float] = (2.0, 4.0),
    bins: int = 100,
    batch_size: int = 64,
) -> list[LayerActivations]:
    """Per-block output statistics of `model` over `calibration` (see the module docstring)."""
    depth = depth_of(model)
    low = torch.full((depth,), float("inf"), dtype=torch.float64)
    high = torch.full((depth,), float("-inf"), dtype=torch.float64)
    total = torch.zeros(depth, dtype=torch.float64)
    squares = torch.zeros(depth, dtype=torch.float64)
    count = torch.zeros(depth, dtype=torch.float64)

    def moments(index: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        x = x_out.double()
        low[index] = min(low[index], x.min().cpu())
        high[index] = max(high[index], x.max().cpu())
        total[index] += x.sum().cpu()
        squares[index] += (x * x).sum().cpu()
        count[index] += x.numel()

    block_inputs_outputs(model, calibration, moments, batch_size)
    mean = total / count
    std = (squares / count - mean * mean).clamp(min=0).sqrt()
    counts = torch.zeros(depth, bins, dtype=torch.float64)
    beyond = torch.zeros(depth, len(ks), dtype=torch.float64)
    max_sigma = torch.zeros(depth, dtype=torch.float64)

    def histogram(index: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        x = x_out.double().flatten(1)  # (N, T*D)
        counts[index] += torch.histc(x, bins, float(low[index]), float(high[index])).cpu()
        distance = (x - x.mean(dim=1, keepdim=True)).abs() / x.std(dim=1, correction=0, keepdim=True).clamp(min=1e-12)
        for j, k in enumerate(ks):
            beyond[index, j] += (distance > k).sum().cpu()
        max_sigma[index] = max(max_sigma[index], distance.max().cpu())

    block_inputs_outputs(model, calibration, histogram, batch_size)
    layers = []
    for i in range(depth):
        edges = np.linspace(float(low[i]), float(high[i]), bins + 1)
        layers.append(LayerActivations(
            layer=i, min=float(low[i]), max=float(high[i]), mean=float(mean[i]), std=float(std[i]),
            max_sigma=float(max_sigma[i]), beyond={float(k): float(beyond[i, j] / count[i]) for j, k in enumerate(ks)},
            counts=counts[i].numpy(), edges=edges,
        ))
    return layers
