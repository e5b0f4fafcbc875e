"""Architecture description of a DiT/SiT backbone, and the named sizes of the original papers.

The config is everything needed to rebuild the network (it is saved as `config.json` next to
the weights), plus two facts the rest of the library needs to use the weights correctly:
what the network was trained to predict (`objective`) and in which space it works (`space`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

OBJECTIVES = ("diffusion", "flow")
SPACES = ("latent", "pixel")

# Heads of the original sizes, keyed by hidden size (DiT paper, Table 1). Checkpoints do not
# store the head count, so loading a foreign checkpoint of another width needs an override.
STANDARD_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}


@dataclass
class DiTConfig:
    """A DiT (or SiT: the same network) backbone.

    Args:
        input_size: spatial size of the model input (latent side, e.g. 32 for 256px images).
        patch_size: side of the square patches that become tokens.
        in_channels: channels of the model input (4 for SD-VAE latents).
        hidden_size: token width D.
        depth: number of transformer blocks.
        num_heads: attention heads per block (D must be divisible by it).
        mlp_ratio: MLP hidden width as a multiple of D.
        num_classes: number of class labels. The label table has one more row, the "null"
            class used by classifier-free guidance, whenever `class_dropout_prob > 0`.
        class_dropout_prob: probability with which training replaces a label by the null
            class. The model itself never drops labels; the training objective does.
        learn_sigma: the output has 2 * in_channels channels: the prediction and the
            interpolation value of the learned variance (DiT). SiT checkpoints also carry
            these channels; the flow objective ignores the second half.
        objective: "diffusion" (DiT: epsilon prediction on 1000 discrete timesteps) or
            "flow" (SiT: velocity of the linear interpolant, continuous t in [0, 1] with t = 1
            at the data).
        space: "latent" (SD-VAE latents scaled by 0.18215) or "pixel" (images in [-1, 1]).
        guided_channels: how many leading prediction channels classifier-free guidance acts
            on; None = all `in_channels`. The original DiT and SiT samplers guide 3 of the 4
            latent channels, so their checkpoint files load with 3 (a quirk kept to reproduce
            their published numbers).
        time_freq_shift: shift of the sinusoidal timestep features: frequencies are
            10000^(-i / (128 - shift)), i = 0..127. 0 is the original DiT/SiT; diffusers'
            `DiTTransformer2DModel` uses 1 (its `downscale_freq_shift`), which is why its outputs
            differ from the original's for the same weights.
        mlp_norm_eps: epsilon of each block's pre-MLP LayerNorm: 1e-6 in the original; a
            diffusers DiT uses its `norm_eps` (1e-5 by default). The other LayerNorms use 1e-6
            in both.
        name: the named size this came from, for display only.
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    objective: str = "diffusion"
    space: str = "latent"
    guided_channels: int | None = None
    time_freq_shift: float = 0.0
    mlp_norm_eps: float = 1e-6
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        problems = _type_problems(self)
        if problems:  # values of the wrong type would fail below with a confusing TypeError
            raise ValueError("invalid model config: " + "; ".join(problems))
        if self.patch_size < 1 or self.input_size % self.patch_size:
            problems.append(
                f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            problems.append(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.depth < 1:
            problems.append(f"depth must be at least 1, got {self.depth}")
        if self.num_classes < 1:
            problems.append(f"num_classes must be at least 1, got {self.num_classes}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            problems.append(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        if self.objective not in OBJECTIVES:
            problems.append(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.space not in SPACES:
            problems.append(f"space must be one of {SPACES}, got {self.space!r}")
        if self.guided_channels is not None and not 1 <= self.guided_channels <= self.in_channels:
            problems.append(f"guided_channels must be in 1..{self.in_channels} or None, got {self.guided_channels}")
        if not 0.0 <= self.time_freq_shift <= 1.0:
            problems.append(f"time_freq_shift must be in [0, 1] (0 original DiT, 1 diffusers), got {self.time_freq_shift}")
        if not 0.0 < self.mlp_norm_eps < 1.0:
            problems.append(f"mlp_norm_eps must be in (0, 1), got {self.mlp_norm_eps}")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def has_null_class(self) -> bool:
        return self.class_dropout_prob > 0

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DiTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **overrides: Any) -> "DiTConfig":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown model config fields {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **overrides)


_FIELD_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "int | None": (int, type(None))}


def _type_problems(config: "DiTConfig") -> list[str]:
    problems = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        allowed = _FIELD_TYPES[f.type]
        wrong_bool = isinstance(value, bool) and bool not in allowed
        if wrong_bool or not isinstance(value, allowed):
            problems.append(f"{f.name} must be {f.type}, got {value!r}")
    return problems


_SIZES = {
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
}

# "DiT-XL/2", "SiT-B/4", ...: the same network; SiT names carry the flow objective.
NAMED_CONFIGS: dict[str, DiTConfig] = {
    f"{family}-{size}/{patch}": DiTConfig(
        patch_size=patch,
        objective="diffusion" if family == "DiT" else "flow",
        name=f"{family}-{size}/{patch}",
        **dims,
    )
    for family in ("DiT", "SiT")
    for size, dims in _SIZES.items()
    for patch in (2, 4, 8)
}


def named_config(name: str, **overrides: Any) -> DiTConfig:
    """The config of a named size ("DiT-XL/2", "SiT-S/4", ...) with fields overridden.

    An override of the network's shape renames it ("DiT-S/2 (custom)"), so a modified size is
    never displayed as the paper's.
    """
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown model name {name!r}; choose one of {', '.join(NAMED_CONFIGS)}")
    base = NAMED_CONFIGS[name]
    config = base.replace(**overrides)
    reshaped = any(getattr(config, k) != getattr(base, k) for k in overrides if k not in ("objective", "space", "name"))
    if reshaped and "name" not in overrides:
        config = config.replace(name=f"{name} (custom)")
    return config
