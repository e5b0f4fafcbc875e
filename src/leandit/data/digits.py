"""The embedded data set: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes).

Pixel space, one channel, values 0..16 mapped linearly to [-1, 1]. Small enough to train,
prune and evaluate a real class-conditional diffusion transformer on a laptop CPU.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

DIGITS_MAX = 16.0


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Images (1797, 8, 8) with values 0..16 and labels (1797,)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """0..16 -> [-1, 1], with a channel axis: (N, 8, 8) -> (N, 1, 8, 8)."""
    x = torch.as_tensor(images, dtype=torch.float32)
    return (x / (DIGITS_MAX / 2) - 1.0).unsqueeze(1)


def to_digits_range(x: torch.Tensor) -> np.ndarray:
    """Model samples in [-1, 1] (N, 1, 8, 8) -> (N, 8, 8) on the 0..16 scale of the data."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1.0) * (DIGITS_MAX / 2)).squeeze(1).numpy()


def digits_dataset() -> TensorDataset:
    """(x, y) pairs: x (1, 8, 8) in [-1, 1], y the digit."""
    images, labels = load_digits_arrays()
    return TensorDataset(to_model_range(images), torch.from_numpy(labels))
