"""Architecture description of a MAR backbone (Li et al. 2024, "Autoregressive Image
Generation without Vector Quantization"), and the named sizes of its release.

MAR is an MAE-style encoder and decoder of ViT blocks over VAE latent tokens, plus a small
MLP "diffusion loss" head that turns each decoder output into a token by denoising. The
config is everything needed to rebuild it (saved as `config.json` beside the weights).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SPACES = ("latent", "pixel")
# The KL-16 VAE of the MAR release multiplies its latents by this before the model sees them.
MAR_LATENT_SCALE = 0.2325


@dataclass
class MARConfig:
    """A MAR backbone.

    Args:
        input_size: side of the model input (latent side: 16 for 256 px images and KL-16).
        patch_size: side of the square patches of the input that become tokens (1 in MAR).
        in_channels: channels of the input (16 for KL-16 latents); a token holds
            in_channels * patch_size^2 values.
        hidden_size, encoder_depth, encoder_heads: the encoder's width, blocks and heads.
        decoder_hidden_size, decoder_depth, decoder_heads: the decoder's.
        mlp_ratio: ViT MLP width as a multiple of the block width.
        buffer_size: the extra tokens before the image tokens that hold the class embedding
            (64 in MAR).
        num_classes: class labels; label `num_classes` means "no class" and is embedded by the
            learned `fake_latent` (the unconditional branch of guidance).
        class_dropout_prob: the label dropout it is trained with (0.1).
        mask_ratio_min: training masks a fraction r of the tokens, r from a normal centred on 1
            with standard deviation 0.25 truncated to [mask_ratio_min, 1].
        head_depth, head_width: residual blocks and width of the diffusion-loss MLP.
        head_batch_mul: how many times each masked token's target is repeated (with its own
            timestep and noise) in a training step.
        head_timesteps: the head's diffusion length in training (cosine schedule).
        head_sampling_steps: its respaced length when generating.
        attn_dropout, proj_dropout: dropout inside the ViT blocks in training (timm's).
        space: "latent" (VAE latents times `latent_scale`) or "pixel" (images in [-1, 1]).
        latent_scale: what the VAE latents were multiplied by (0.2325 for KL-16).
        name: the named size it came from, for display only.
    """

    input_size: int = 16
    patch_size: int = 1
    in_channels: int = 16
    hidden_size: int = 1024
    encoder_depth: int = 16
    encoder_heads: int = 16
    decoder_hidden_size: int = 1024
    decoder_depth: int = 16
    decoder_heads: int = 16
    mlp_ratio: float = 4.0
    buffer_size: int = 64
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    mask_ratio_min: float = 0.7
    head_depth: int = 3
    head_width: int = 1024
    head_batch_mul: int = 4
    head_timesteps: int = 1000
    head_sampling_steps: int = 100
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    space: str = "latent"
    latent_scale: float = MAR_LATENT_SCALE
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        problems = _type_problems(self)
        if problems:
            raise ValueError("invalid MAR config: " + "; ".join(problems))
        if self.patch_size < 1 or self.input_size % self.patch_size:
            problems.append(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        for width, heads, part in ((self.hidden_size, self.encoder_heads, "encoder"),
                                   (self.decoder_hidden_size, self.decoder_heads, "decoder")):
            if heads < 1 or width % heads:
                problems.append(f"the {part} width {width} is not divisible by its {heads} heads")
        if self.encoder_depth < 0 or self.decoder_depth < 0 or self.encoder_depth + self.decoder_depth < 1:
            problems.append(f"needs at least one block (encoder {self.encoder_depth}, decoder {self.decoder_depth})")
        for name in ("num_classes", "head_depth", "head_width", "head_batch_mul", "head_timesteps", "head_sampling_steps", "in_channels"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.buffer_size < 1:
            problems.append(f"buffer_size must be at least 1 (the class embedding lives there), got {self.buffer_size}")
        if self.head_sampling_steps > self.head_timesteps:
            problems.append(f"head_sampling_steps {self.head_sampling_steps} exceeds head_timesteps {self.head_timesteps}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            problems.append(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        if not 0.0 < self.mask_ratio_min <= 1.0:
            problems.append(f"mask_ratio_min must be in (0, 1], got {self.mask_ratio_min}")
        for name in ("attn_dropout", "proj_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.space not in SPACES:
            problems.append(f"space must be one of {SPACES}, got {self.space!r}")
        if not self.latent_scale > 0:
            problems.append(f"latent_scale must be positive, got {self.latent_scale}")
        if problems:
            raise ValueError("invalid MAR config: " + "; ".join(problems))

    @property
    def objective(self) -> str:
        return "masked"

    @property
    def depth(self) -> int:
        """All blocks, encoder and decoder together (the paper's "32 blocks" of MAR-L)."""
        return self.encoder_depth + self.decoder_depth

    @property
    def token_dim(self) -> int:
        return self.in_channels * self.patch_size**2

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def seq_side(self) -> int:
        return self.input_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MARConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MAR config fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **overrides: Any) -> "MARConfig":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown MAR config fields {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **overrides)


_FIELD_TYPES = {"int": (int,), "float": (int, float), "str": (str,)}


def _type_problems(config: MARConfig) -> list[str]:
    problems = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        allowed = _FIELD_TYPES[f.type]
        if isinstance(value, bool) or not isinstance(value, allowed):
            problems.append(f"{f.name} must be {f.type}, got {value!r}")
    return problems


# The released sizes (MAR README: the diffusion-loss MLP of each released checkpoint).
MAR_SIZES: dict[str, MARConfig] = {
    "MAR-B": MARConfig(hidden_size=768, encoder_depth=12, encoder_heads=12, decoder_hidden_size=768, decoder_depth=12,
                       decoder_heads=12, head_depth=6, head_width=1024, name="MAR-B"),
    "MAR-L": MARConfig(hidden_size=1024, encoder_depth=16, encoder_heads=16, decoder_hidden_size=1024, decoder_depth=16,
                       decoder_heads=16, head_depth=8, head_width=1280, name="MAR-L"),
    "MAR-H": MARConfig(hidden_size=1280, encoder_depth=20, encoder_heads=16, decoder_hidden_size=1280, decoder_depth=20,
                       decoder_heads=16, head_depth=12, head_width=1536, name="MAR-H"),
}


def named_mar_config(name: str, **overrides: Any) -> MARConfig:
    """The config of a released size ("MAR-B", "MAR-L", "MAR-H") with fields overridden (an
    override of the shape renames it "... (custom)")."""
    if name not in MAR_SIZES:
        raise ValueError(f"unknown MAR size {name!r}; choose one of {', '.join(MAR_SIZES)}")
    base = MAR_SIZES[name]
    config = base.replace(**overrides)
    reshaped = any(getattr(config, k) != getattr(base, k) for k in overrides if k not in ("space", "name"))
    if reshaped and "name" not in overrides:
        config = config.replace(name=f"{name} (custom)")
    return config


__all__ = ["MARConfig", "MAR_LATENT_SCALE", "MAR_SIZES", "named_mar_config"]
