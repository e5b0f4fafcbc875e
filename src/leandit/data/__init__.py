"""Training data: the embedded digits, and sharded VAE latents of real image folders (with
class labels or caption embeddings: `LatentShardDataset.conditioning`)."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from .digits import digits_dataset

def open_training_data(spec: str) -> Dataset:
    """"digits" (the embedded data set) or a folder of latent shards (extract-features):
    items (latent, label) for class-label folders, (latent, {"text", "text_mask"}) for
    captioned ones."""
    if spec == "digits":
        return digits_dataset()
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(
            f"data not found: {spec} (pass 'digits' or a folder written by 'leandit extract-features')"
        )
    from .latents import LatentShardDataset

    return LatentShardDataset(path)


__all__ = ["digits_dataset", "open_training_data"]
