"""Feature networks for the sample-quality metrics, and feature extraction from image files.

Every network maps uint8 images (N, H, W, C) to three feature sets: "pool" (FID, precision,
recall), "spatial" (sFID) and "logits" (Inception Score).

- `InceptionFeatures`: the TF-2015 Inception-v3 that the ADM evaluator and pytorch-fid use,
  as torch-fidelity implements it (bilinear resize like TF1 to 299, pool_3 2048 features,
  1008 unbiased logits) plus the spatial features of the ADM evaluator: the first 7 channels
  of mixed_6/conv (17 x 17 x 7 = 2023). Loaded from a local weights file only.
- `DigitsFeatures`: a small CNN trained on the embedded 8x8 digits (see digits_features.py);
  its metrics are "digits-FID" etc., never comparable with Inception numbers.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"


class InceptionFeatures(nn.Module):
    """Inception-v3 (FID weights) features of uint8 RGB images; grayscale is repeated to RGB."""

    name = "inception-v3-2015-12-05"

    def __init__(self, weights: str | Path):
        super().__init__()
        weights = Path(weights)
        if not weights.is_file():
            raise FileNotFoundError(
                f"Inception weights not found: {weights}. The metrics need torch-fidelity's FID Inception weights "
                f"({INCEPTION_WEIGHTS_FILE}, published at {INCEPTION_WEIGHTS_URL}); download it once and pass --inception PATH"
            )
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        try:
            # Checked with the safe loader first: torch-fidelity itself unpickles without limits.
            state = torch.load(weights, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ValueError("not a state dict of tensors")
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"], str(weights))
        except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise OSError(f"{weights}: not Inception FID weights ({first}); expected {INCEPTION_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL}") from None
        self.net.eval()
        self.name = f"{InceptionFeatures.name}-{file_digest(weights)[:12]}"  # cache entries per weights file
        self._spatial: torch.Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._spatial = output[:, :7]  # (N, 7, 17, 17): mixed_6/conv, the first 7 channels

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.permute(0, 3, 1, 2)  # (N, C, H, W) uint8
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        pool, logits = self.net(x.contiguous())
        spatial = self._spatial.permute(0, 2, 3, 1).flatten(1)  # (N, 17*17*7), the ADM (H, W, C) order
        return {"pool": pool, "spatial": spatial, "logits": logits}


def file_digest(path: str | Path) -> str:
    """sha256 of a file, read in chunks (reference files are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_images(path: str | Path) -> np.ndarray:
    """arr_0 of an ADM-layout .npz: uint8 images (N, H, W, C), checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path} (make one with `leandit sample`)")
    try:
        with np.load(path) as data:
            if "arr_0" not in data:
                raise ValueError(f"{path}: no arr_0: not an ADM-layout sample file (arr_0 = N x H x W x C uint8)")
            images = data["arr_0"]
    except (OSError, EOFError, ValueError) as err:
        if "arr_0" in str(err):
            raise
        raise OSError(f"{path}: not a readable .npz ({err}); is it complete?") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"{path}: arr_0 is {images.dtype} {images.shape}; expected uint8 N x H x W x C with N >= 1 and C = 1 or 3")
    return images


@torch.no_grad()
def extract_features(
    net: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    images: np.ndarray,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """The network's feature sets of all images, as float32 arrays."""
    parts: dict[str, list[np.ndarray]] = {}
    for start in tqdm(range(0, len(images), batch_size), disable=not progress, desc="features", leave=False):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)
        for name, value in net(batch).items():
            parts.setdefault(name, []).append(value.float().cpu().numpy())
    return {name: np.concatenate(values) for name, values in parts.items()}


def cached_features(
    net, name: str, images_path: Path, images: np.ndarray, cache_dir: Path | None, **extract_options
) -> dict[str, np.ndarray]:
    """Features of a file's images, cached under `cache_dir` by the file's content hash and the
    network's name (reference statistics are computed once)."""
    if cache_dir is None:
        return extract_features(net, images, **extract_options)
    digest = file_digest(images_path)[:20]
    cache = Path(cache_dir) / f"{name}-{digest}.npz"
    if cache.is_file():
        with np.load(cache) as data:
            return {key: data[key] for key in data.files}
    features = extract_features(net, images, **extract_options)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, **features)
    tmp.replace(cache)
    return features
