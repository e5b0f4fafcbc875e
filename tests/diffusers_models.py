"""Tiny diffusers transformers built from configs (never the hub), and a tiny captioned data set,
for the backbone-interface tests."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from conftest import randomize_


def tiny_diffusers_dit(depth: int = 4, seed: int = 0, **overrides):
    """A DiTTransformer2DModel on 8x8 one-channel images with 10 classes (the digits' shape),
    in pixel space, with random weights (every block's embedder copies kept identical, as
    in a converted checkpoint)."""
    from diffusers import DiTTransformer2DModel

    fields = dict(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2, num_layers=depth,
                  sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    fields.update(overrides)
    model = DiTTransformer2DModel(**fields)
    randomize_(model, std=0.2, seed=seed)
    share_embedders_(model)
    model.leandit_info = {"objective": "diffusion", "space": "pixel"}
    # As load_model hands it out: the label embedders' own dropout off (in training mode they
    # would drop labels at random in every forward).
    from leandit.backbones import backbone

    return backbone(model).prepare()


def share_embedders_(model) -> None:
    """Make every block's copy of the time/class embedders equal to block 0's."""
    first = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first)


def tiny_pixart(depth: int = 4, seed: int = 0, caption_channels: int = 16, **overrides):
    from diffusers import PixArtTransformer2DModel

    fields = dict(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2, num_layers=depth,
                  sample_size=8, patch_size=2, caption_channels=caption_channels, cross_attention_dim=16)
    fields.update(overrides)
    model = PixArtTransformer2DModel(**fields)
    randomize_(model, std=0.2, seed=seed)
    model.leandit_info = {"objective": "diffusion", "space": "pixel"}
    return model


class CaptionedDigits(Dataset):
    """The digits with a fixed random 'embedding' per class as their caption (length 6, width
    16; the mask covers 2-5 tokens), plus the empty prompt: the layout captioned latents have."""

    conditioning = "text"

    def __init__(self, length: int = 6, dim: int = 16):
        from leandit.data import digits_dataset

        self.digits = digits_dataset()
        gen = torch.Generator().manual_seed(7)
        self.embeddings = torch.randn(10, length, dim, generator=gen)
        self.masks = torch.zeros(10, length, dtype=torch.long)
        for c in range(10):
            self.masks[c, : 2 + c % 4] = 1
        self.null_condition = {"text": torch.randn(length, dim, generator=gen), "text_mask": torch.tensor([1] + [0] * (length - 1))}

    def __len__(self) -> int:
        return len(self.digits)

    def __getitem__(self, i):
        x, y = self.digits[i]
        return x, {"text": self.embeddings[int(y)], "text_mask": self.masks[int(y)]}
