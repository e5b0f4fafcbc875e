"""Infer a MAR architecture from the tensors of a state dict with the release's key names
(Li et al. 2024, `checkpoint-last.pth` of MAR-B/L/H).

Every shape fact comes from a tensor: the encoder and decoder widths from `z_proj` and
`decoder_embed`, their depths from the block indices, the token count from
`diffusion_pos_embed_learned` and the buffer from the extra rows of the encoder's position
embedding, the classes from `class_emb` (the "no class" input is the separate
`fake_latent`), the head's depth and width from `diffloss.net.res_blocks` and `input_proj`,
the MLP ratio from `fc1`. The tensors cannot tell the head count, nor how a token's values
split into latent channels and patch pixels: the heads come from the table of the released
widths (or an override), the split from the checkpoint's training `args` when it has them,
else MAR's own choice (patch size 1, so a token is one latent pixel of all its channels).
The training-only settings (dropout, mask ratio, label dropout, the head's batch multiplier
and sampling steps) are read from `args` too when they are there.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch

from .infer import CheckpointError
from .mar_config import MAR_SIZES, MARConfig

# Keys only a MAR state dict has: how `load_model` tells a MAR file from a DiT one.
MAR_MARKER_KEYS = ("encoder_blocks.0.attn.qkv.weight", "diffloss.net.input_proj.weight")
REQUIRED_KEYS = (
    "z_proj.weight",
    "class_emb.weight",
    "encoder_pos_embed_learned",
    "decoder_embed.weight",
    "decoder_pos_embed_learned",
    "diffusion_pos_embed_learned",
    "diffloss.net.input_proj.weight",
)
# Heads of the released widths (MAR-B 768 -> 12, MAR-L 1024 -> 16, MAR-H 1280 -> 16).
STANDARD_MAR_HEADS = {768: 12, 1024: 16, 1280: 16}
# What the architecture is (the named sizes are compared on these, not on training settings).
SHAPE_FIELDS = (
    "input_size", "patch_size", "in_channels", "hidden_size", "encoder_depth", "encoder_heads",
    "decoder_hidden_size", "decoder_depth", "decoder_heads", "mlp_ratio", "buffer_size", "num_classes",
    "head_depth", "head_width",
)
# Training arguments of MAR's main_mar.py -> the MARConfig field they set (plain numbers).
_ARG_FIELDS = {
    "mask_ratio_min": ("mask_ratio_min", float),
    "label_drop_prob": ("class_dropout_prob", float),
    "diffusion_batch_mul": ("head_batch_mul", int),
    "num_sampling_steps": ("head_sampling_steps", int),  # a string such as "100" in main_mar.py
    "attn_dropout": ("attn_dropout", float),
    "proj_dropout": ("proj_dropout", float),
}


def is_mar_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether the keys are those of a MAR network (the release's names)."""
    return any(key in state_dict for key in MAR_MARKER_KEYS)


def training_args(args: Any) -> dict[str, Any]:
    """The plain values of a checkpoint's `args` (an argparse.Namespace or a dict); {} for none."""
    if args is None:
        return {}
    items = vars(args) if hasattr(args, "__dict__") and not isinstance(args, Mapping) else args
    if not isinstance(items, Mapping):
        return {}
    return {str(k): v for k, v in items.items() if isinstance(v, (bool, int, float, str))}


def infer_mar_config(
    state_dict: Mapping[str, torch.Tensor],
    *,
    args: Any = None,
    num_heads: int | None = None,
    space: str | None = None,
    name: str = "",
) -> MARConfig:
    """The MARConfig whose network has exactly these tensors.

    Args:
        args: the checkpoint's training arguments (`checkpoint["args"]`, a Namespace or dict),
            for the split of a token into channels and patch pixels and the training
            settings; without them, MAR's defaults (patch size 1, the values of MARConfig).
            Shape facts in `args` that contradict the tensors are an error; a training
            setting leandit cannot use (num_sampling_steps "ddim25") keeps its default.
        num_heads: the head count of encoder and decoder; needed when a width is not a
            released one (768, 1024, 1280).
        space: "latent" or "pixel"; default latent (MAR's release trains on KL-16 latents).
        name: shown when the shapes are not a released size's.
    """
    sd = state_dict
    missing = [k for k in REQUIRED_KEYS if k not in sd]
    if missing:
        raise CheckpointError(
            f"not a MAR state dict: missing {', '.join(missing)} (found keys like {', '.join(list(sd)[:4])})"
        )
    train = training_args(args)
    hidden, token_dim = _shape(sd, "z_proj.weight", 2)
    decoder_hidden, decoder_in = _shape(sd, "decoder_embed.weight", 2)
    if decoder_in != hidden:
        raise CheckpointError(f"decoder_embed.weight takes {decoder_in} inputs, the encoder width is {hidden}")
    num_tokens = _shape(sd, "diffusion_pos_embed_learned", 3)[1]
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise CheckpointError(f"diffusion_pos_embed_learned has {num_tokens} tokens, not a square grid")
    buffer_size = _shape(sd, "encoder_pos_embed_learned", 3)[1] - num_tokens
    if buffer_size < 1:
        raise CheckpointError(
            f"encoder_pos_embed_learned has {buffer_size + num_tokens} rows for {num_tokens} tokens: no buffer rows"
        )
    encoder_depth = _count_blocks(sd, "encoder_blocks")
    decoder_depth = _count_blocks(sd, "decoder_blocks")
    first = "encoder_blocks.0" if encoder_depth else "decoder_blocks.0"
    width = hidden if encoder_depth else decoder_hidden
    mlp_ratio = _mlp_ratio(_shape(sd, f"{first}.mlp.fc1.weight", 2)[0], width)
    head_width, head_in = _shape(sd, "diffloss.net.input_proj.weight", 2)
    if head_in != token_dim:
        raise CheckpointError(f"diffloss.net.input_proj.weight takes {head_in} values, the tokens have {token_dim}")
    head_depth = _count_blocks(sd, "diffloss.net.res_blocks")
    num_classes = _shape(sd, "class_emb.weight", 2)[0]

    patch_size, in_channels, input_size = _token_layout(train, token_dim, side)
    encoder_heads = _heads(hidden, num_heads, "encoder")
    decoder_heads = _heads(decoder_hidden, num_heads, "decoder")
    fields: dict[str, Any] = dict(
        input_size=input_size,
        patch_size=patch_size,
        in_channels=in_channels,
        hidden_size=hidden,
        encoder_depth=encoder_depth,
        encoder_heads=encoder_heads,
        decoder_hidden_size=decoder_hidden,
        decoder_depth=decoder_depth,
        decoder_heads=decoder_heads,
        mlp_ratio=mlp_ratio,
        buffer_size=buffer_size,
        num_classes=num_classes,
        head_depth=head_depth,
        head_width=head_width,
        space=space or "latent",
    )
    for arg, field in (("buffer_size", "buffer_size"), ("class_num", "num_classes"),
                       ("diffloss_d", "head_depth"), ("diffloss_w", "head_width")):
        value = _number(train.get(arg), int)
        if value is not None and value != fields[field]:
            raise CheckpointError(f"the checkpoint's args say {arg}={value}, its tensors {field}={fields[field]}")
    try:
        config = MARConfig(**fields)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    for arg, (field, kind) in _ARG_FIELDS.items():
        value = _number(train.get(arg), kind)
        if value is None:  # absent, or not a number (a respacing such as "ddim25"): the default
            continue
        try:
            config = config.replace(**{field: value})
        except ValueError:  # a training setting leandit cannot use does not keep the weights from loading
            continue
    return config.replace(name=released_size(config) or name)


def released_size(config: MARConfig) -> str | None:
    """"MAR-B"/"MAR-L"/"MAR-H" when the architecture is that released size's, else None."""
    for size, base in MAR_SIZES.items():
        if all(getattr(config, f) == getattr(base, f) for f in SHAPE_FIELDS):
            return size
    return None


def _shape(sd: Mapping[str, torch.Tensor], key: str, dims: int) -> tuple[int, ...]:
    shape = tuple(sd[key].shape)
    if len(shape) != dims:
        raise CheckpointError(f"{key} has shape {shape}; a MAR checkpoint's has {dims} dimensions")
    return shape


def _count_blocks(sd: Mapping[str, Any], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    ids = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    if ids != set(range(len(ids))):
        raise CheckpointError(f"{prefix} indices are not 0..{len(ids) - 1}: {sorted(ids)}")
    return len(ids)


def _mlp_ratio(mlp_hidden: int, width: int) -> float:
    ratio = mlp_hidden / width
    while int(width * ratio) < mlp_hidden:  # the block builds int(width * ratio) units: nudge up
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def _heads(width: int, num_heads: int | None, part: str) -> int:
    if num_heads is not None:
        return int(num_heads)
    if width not in STANDARD_MAR_HEADS:
        raise CheckpointError(
            f"the {part} width {width} is not a released MAR width {sorted(STANDARD_MAR_HEADS)}: "
            "pass the head count explicitly (num_heads=... / --num-heads)"
        )
    return STANDARD_MAR_HEADS[width]


def _token_layout(train: Mapping[str, Any], token_dim: int, side: int) -> tuple[int, int, int]:
    """(patch_size, in_channels, input_size) of tokens of `token_dim` values on a side x side grid."""
    patch = _number(train.get("patch_size"), int) or 1
    channels = _number(train.get("vae_embed_dim"), int)
    if channels is None:
        channels, rem = divmod(token_dim, patch * patch)
        if rem:
            raise CheckpointError(f"tokens of {token_dim} values cannot be {patch}x{patch} patches (args patch_size={patch})")
    if channels * patch * patch != token_dim:
        raise CheckpointError(
            f"the checkpoint's args say vae_embed_dim={channels}, patch_size={patch} ({channels * patch * patch} values "
            f"a token), its tensors {token_dim}"
        )
    input_size = side * patch
    img_size, stride = _number(train.get("img_size"), int), _number(train.get("vae_stride"), int)
    if img_size and stride and img_size // stride != input_size:
        raise CheckpointError(
            f"the checkpoint's args say img_size={img_size}, vae_stride={stride} (a {img_size // stride}-latent side), "
            f"its tensors {side} tokens a side of patch {patch}"
        )
    return patch, channels, input_size


def _number(value: Any, kind: type) -> Any:
    """`value` as an int/float when it is one (or a string of one), else None."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        return None
    if kind is int and isinstance(value, float) and value != number:
        return None
    return number


__all__ = ["MAR_MARKER_KEYS", "STANDARD_MAR_HEADS", "infer_mar_config", "is_mar_state_dict", "released_size", "training_args"]
