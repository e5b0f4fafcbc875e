"""Conversion between leandit's DiT (the original release's layout) and diffusers'
`DiTTransformer2DModel`, both ways, with an explicit key map and a shape check on every tensor.

What differs between the two layouts (diffusers 0.42.1), and how each difference is handled:
- diffusers' timestep features use a frequency shift of 1 (`downscale_freq_shift=1`, fixed in
  `CombinedTimestepLabelEmbeddings`), the original 0. leandit's `DiTConfig.time_freq_shift`
  expresses either, so diffusers -> leandit is exact. leandit -> diffusers copies the weights
  exactly, but a model trained with shift 0 then computes something slightly different in
  diffusers (measured in benchmarks/convert_dit.md); it cannot be avoided, because the shift
  changes the frequencies of the features the weights were trained on.
- The pre-MLP LayerNorm eps is diffusers' `norm_eps` (1e-5 by default) vs 1e-6 in the original:
  both directions carry it (`DiTConfig.mlp_norm_eps` <-> `norm_eps`), so it never differs.
- diffusers copies the time and class embedders into every block
  (`transformer_blocks.{i}.norm1.emb`), and its output head reads block 0's copy. leandit ->
  diffusers writes the same tensors into every block; diffusers -> leandit refuses a model
  whose copies differ (one embedder cannot express them).
- The label table always has the null-class row in diffusers (`class_dropout_prob` is fixed at
  0.1 there, and its `LabelEmbedding` drops labels itself in training mode, once per block). A
  leandit model without a null class gets a zero row, which the way back removes again.
- The fixed sin-cos position table is a saved buffer in the original and a recomputed,
  unsaved one in diffusers: the two are the same bits (checked), and a leandit table that is
  not the standard one is refused.
- adaLN chunk order is the same in both (shift, scale, gate for attention, then for the MLP;
  shift, scale for the output head): checked by the outputs in tests/test_convert.py.
- Guidance: the original samplers guide 3 of 4 latent channels, diffusers' DiTPipeline all.

Facts a diffusers config cannot hold (the time shift the weights were trained with, label
dropout, null class, guided channels, objective, space, name) travel in `model.leandit_info`,
a plain JSON-serialisable dict that is written as leandit.json beside a diffusers folder. A
diffusers model that carries it converts back to exactly the leandit model it came from.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from .config import DiTConfig
from .dit import DiT, sincos_pos_embed_2d
from .infer import check_keys
from .io import model_from_state_dict

DIFFUSERS_CLASS = "DiTTransformer2DModel"
DIFFUSERS_TIME_FREQ_SHIFT = 1.0  # Timesteps(downscale_freq_shift=1) in CombinedTimestepLabelEmbeddings
DIFFUSERS_CLASS_DROPOUT = 0.1  # fixed in CombinedTimestepLabelEmbeddings: the label table has the null row
# `model.leandit_info` key -> the DiTConfig field it records: what a diffusers config has no
# place for. objective, space, guided_channels, name and condition_dropout are the keys
# leandit's diffusers backbone reads (leandit.backbones.diffusers); time_freq_shift is the
# shift the weights were trained with, present only when they came from a leandit DiT.
INFO_FIELDS = {
    "objective": "objective",
    "space": "space",
    "guided_channels": "guided_channels",
    "name": "name",
    "condition_dropout": "class_dropout_prob",
    "time_freq_shift": "time_freq_shift",
}

# ------------------------------------------------------------------------------ key maps

# One leandit tensor -> one diffusers tensor, outside the blocks.
TOP_KEYS = {
    "x_embedder.proj.weight": "pos_embed.proj.weight",
    "x_embedder.proj.bias": "pos_embed.proj.bias",
    "final_layer.adaLN_modulation.1.weight": "proj_out_1.weight",
    "final_layer.adaLN_modulation.1.bias": "proj_out_1.bias",
    "final_layer.linear.weight": "proj_out_2.weight",
    "final_layer.linear.bias": "proj_out_2.bias",
}
# leandit's one time/class embedder -> the copy inside every diffusers block.
EMBEDDER_KEYS = {
    "t_embedder.mlp.0.weight": "norm1.emb.timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "norm1.emb.timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "norm1.emb.timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "norm1.emb.timestep_embedder.linear_2.bias",
    "y_embedder.embedding_table.weight": "norm1.emb.class_embedder.embedding_table.weight",
}
# Inside block i: `blocks.{i}.<key>` -> `transformer_blocks.{i}.<value>`.
BLOCK_KEYS = {
    "adaLN_modulation.1.weight": "norm1.linear.weight",
    "adaLN_modulation.1.bias": "norm1.linear.bias",
    "attn.proj.weight": "attn1.to_out.0.weight",
    "attn.proj.bias": "attn1.to_out.0.bias",
    "mlp.fc1.weight": "ff.net.0.proj.weight",
    "mlp.fc1.bias": "ff.net.0.proj.bias",
    "mlp.fc2.weight": "ff.net.2.weight",
    "mlp.fc2.bias": "ff.net.2.bias",
}
# The fused qkv projection: its output rows are [q; k; v], each D rows (heads contiguous).
QKV_KEYS = {
    "attn.qkv.weight": ("attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight"),
    "attn.qkv.bias": ("attn1.to_q.bias", "attn1.to_k.bias", "attn1.to_v.bias"),
}
NULL_ROW_KEY = "y_embedder.embedding_table.weight"


def _diffusers_class():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel


# ------------------------------------------------------------------------------ configs


def diffusers_config(config: DiTConfig) -> dict[str, Any]:
    """The `DiTTransformer2DModel` constructor arguments of the network `config` describes."""
    if config.mlp_hidden != 4 * config.hidden_size:
        raise ValueError(
            f"diffusers' DiT has a fixed MLP ratio of 4; this model's MLP has {config.mlp_hidden} channels "
            f"for hidden size {config.hidden_size} (ratio {config.mlp_ratio:g}): it cannot be expressed"
        )
    return dict(
        num_attention_heads=config.num_heads,
        attention_head_dim=config.hidden_size // config.num_heads,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_layers=config.depth,
        dropout=0.0,
        attention_bias=True,
        sample_size=config.input_size,
        patch_size=config.patch_size,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=config.num_classes,
        upcast_attention=False,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=config.mlp_norm_eps,
    )


# What a diffusers DiT config must say for leandit's DiT to compute the same thing.
_REQUIRED_DIFFUSERS = {
    "norm_type": "ada_norm_zero",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "norm_elementwise_affine": False,
}


def dit_config_from_diffusers(
    dconfig: Mapping[str, Any],
    *,
    info: Mapping[str, Any] | None = None,
    objective: str | None = None,
    space: str | None = None,
) -> DiTConfig:
    """The DiTConfig of a diffusers DiT config.

    Without `info` the result computes exactly what the diffusers model computes (time shift
    1, its eps, a null class, all channels guided). `info` (`model.leandit_info`, read from
    leandit.json) gives the facts the diffusers config cannot hold (objective, space, guided
    channels, name, label dropout); when it also has `time_freq_shift` (written by
    `dit_to_diffusers`), the result is exactly the leandit model the weights came from (an
    original DiT: shift 0). `objective`/`space`, when given, win over both.
    """
    wrong = [f"{k} = {dconfig.get(k)!r} (leandit needs {v!r})" for k, v in _REQUIRED_DIFFUSERS.items() if dconfig.get(k, v) != v]
    if dconfig.get("num_embeds_ada_norm") is None:
        wrong.append("num_embeds_ada_norm is None (a class-conditional DiT needs a class count)")
    if dconfig.get("dropout", 0.0):
        wrong.append(f"dropout = {dconfig['dropout']} (leandit's DiT has no dropout; set it to 0 to convert)")
    if wrong:
        raise ValueError("this diffusers DiT cannot be expressed as leandit's DiT: " + "; ".join(wrong))
    heads, head_dim = int(dconfig["num_attention_heads"]), int(dconfig["attention_head_dim"])
    in_channels = int(dconfig["in_channels"])
    out_channels = dconfig.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(
            f"diffusers DiT with {out_channels} output channels for {in_channels} input channels: leandit's DiT "
            "predicts in_channels (or 2 x in_channels with learned sigma)"
        )
    fields: dict[str, Any] = dict(
        input_size=int(dconfig["sample_size"]),
        patch_size=int(dconfig["patch_size"]),
        in_channels=in_channels,
        hidden_size=heads * head_dim,
        depth=int(dconfig["num_layers"]),
        num_heads=heads,
        mlp_ratio=4.0,
        num_classes=int(dconfig["num_embeds_ada_norm"]),
        class_dropout_prob=DIFFUSERS_CLASS_DROPOUT,
        learn_sigma=out_channels == 2 * in_channels,
        objective="diffusion",
        space="latent" if in_channels == 4 else "pixel",
        guided_channels=None,  # diffusers' DiTPipeline guides every latent channel
        time_freq_shift=DIFFUSERS_TIME_FREQ_SHIFT,
        mlp_norm_eps=float(dconfig.get("norm_eps", 1e-5)),
    )
    for key, field_name in INFO_FIELDS.items():  # other keys belong to other parts of leandit
        if info and key in info:
            fields[field_name] = info[key]
    if objective is not None:
        fields["objective"] = objective
    if space is not None:
        fields["space"] = space
    return DiTConfig(**fields)


def leandit_info(config: DiTConfig) -> dict[str, Any]:
    """The facts of a leandit DiT that its diffusers copy's config cannot hold: a plain,
    JSON-serialisable dict (`model.leandit_info`, which save_model writes to leandit.json)."""
    info: dict[str, Any] = {key: getattr(config, field_name) for key, field_name in INFO_FIELDS.items()}
    # time_freq_shift: what the weights were trained with (0: original DiT/SiT), whereas
    # diffusers always computes with 1; converting back restores it.
    info["converted_from"] = "leandit DiT (original DiT/SiT layout)"
    return info


# ------------------------------------------------------------------------------ state dicts


def dit_state_dict_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: DiTConfig) -> dict[str, torch.Tensor]:
    """leandit/original DiT tensors -> `DiTTransformer2DModel` tensors (new tensors, the same
    values; qkv split in three; the embedders copied into every block; a zero null-class row
    added when the model has none).

    Checks every key and shape of the source against `config`. `pos_embed` has no diffusers
    counterpart (diffusers recomputes the same table): it must be the standard sin-cos table.
    """
    with torch.device("meta"):
        expected = DiT(config).state_dict()
    check_keys(expected, state_dict, "leandit DiT state dict")
    pos = state_dict["pos_embed"].detach()
    standard = _standard_pos_embed(config)  # (1, T, D)
    pos_diff = (pos.float().cpu().reshape(standard.shape) - standard).abs().max().item()
    if pos_diff > torch.finfo(pos.dtype).eps:  # 0 for the original and leandit tables; rounding in fp16/bf16
        raise ValueError(
            f"pos_embed differs from the fixed sin-cos table by up to {pos_diff:.3g}: diffusers recomputes that "
            "table and cannot store another one"
        )
    out: dict[str, torch.Tensor] = {}
    for key, target in TOP_KEYS.items():
        out[target] = state_dict[key].detach().clone()
    table = state_dict[NULL_ROW_KEY].detach()
    if not config.has_null_class:  # diffusers' label table always has the null row
        table = torch.cat([table, torch.zeros_like(table[:1])])  # (num_classes + 1, D)
    embedder = {key: state_dict[key].detach() for key in EMBEDDER_KEYS}
    embedder[NULL_ROW_KEY] = table
    for i in range(config.depth):
        for key, target in EMBEDDER_KEYS.items():
            out[f"transformer_blocks.{i}.{target}"] = embedder[key].clone()
        for key, target in BLOCK_KEYS.items():
            out[f"transformer_blocks.{i}.{target}"] = state_dict[f"blocks.{i}.{key}"].detach().clone()
        for key, targets in QKV_KEYS.items():
            fused = state_dict[f"blocks.{i}.{key}"].detach()  # (3 D, ...), checked above
            for target, part in zip(targets, fused.chunk(3, dim=0)):
                out[f"transformer_blocks.{i}.{target}"] = part.clone()  # (D, ...)
    return out


def diffusers_state_dict_to_dit(
    state_dict: Mapping[str, torch.Tensor], config: DiTConfig, pos_embed: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """`DiTTransformer2DModel` tensors -> leandit/original DiT tensors for `config` (new
    tensors, the same values).

    Refuses (ValueError naming the block) per-block embedder copies that differ from block
    0's. `pos_embed` is the diffusers model's own (unsaved) position buffer, default the
    standard sin-cos table (the same bits).
    """
    dconfig = diffusers_config(config)
    with torch.device("meta"):
        expected = _diffusers_class()(**dconfig).state_dict()
    check_keys(expected, state_dict, "diffusers DiT state dict")
    for i in range(1, config.depth):
        for target in EMBEDDER_KEYS.values():
            first, copy = state_dict[f"transformer_blocks.0.{target}"], state_dict[f"transformer_blocks.{i}.{target}"]
            if not torch.equal(first, copy):
                raise ValueError(
                    f"block {i}'s time/class embedder differs from block 0's (transformer_blocks.{i}.{target}): "
                    "leandit's DiT has one embedder for all blocks, so this model cannot be expressed"
                )
    out: dict[str, torch.Tensor] = {}
    if pos_embed is None:
        pos_embed = _standard_pos_embed(config)
    out["pos_embed"] = pos_embed.detach().reshape(1, config.num_tokens, config.hidden_size).clone()
    for key, target in TOP_KEYS.items():
        out[key] = state_dict[target].detach().clone()
    for key, target in EMBEDDER_KEYS.items():
        out[key] = state_dict[f"transformer_blocks.0.{target}"].detach().clone()
    if not config.has_null_class:
        out[NULL_ROW_KEY] = out[NULL_ROW_KEY][:-1].clone()  # the row diffusers always has, added on the way in
    for i in range(config.depth):
        for key, target in BLOCK_KEYS.items():
            out[f"blocks.{i}.{key}"] = state_dict[f"transformer_blocks.{i}.{target}"].detach().clone()
        for key, targets in QKV_KEYS.items():
            parts = [state_dict[f"transformer_blocks.{i}.{t}"].detach() for t in targets]  # 3 x (D, ...)
            out[f"blocks.{i}.{key}"] = torch.cat(parts, dim=0)  # (3 D, ...)
    with torch.device("meta"):
        check_keys(DiT(config).state_dict(), out, "converted DiT state dict")
    return out


# ------------------------------------------------------------------------------ models


def dit_to_diffusers(model: DiT):
    """A `DiTTransformer2DModel` with exactly `model`'s weights (copies), in eval mode.

    It carries `source` and `compression` like the leandit model, and `leandit_info` (see
    `leandit_info`): what converts it back to exactly `model`. Its outputs differ from
    `model`'s only when `model.config.time_freq_shift` is not diffusers' 1 (an original
    DiT/SiT: see benchmarks/convert_dit.md for the size of the difference).
    """
    if not isinstance(model, DiT):
        raise TypeError(f"dit_to_diffusers takes a leandit DiT, got {type(model).__name__}")
    config = model.config
    tensors = dit_state_dict_to_diffusers(model.state_dict(), config)
    cls = _diffusers_class()
    with torch.device("meta"):
        converted = cls(**diffusers_config(config))
    check_keys(converted.state_dict(), tensors, "converted diffusers state dict")
    converted.load_state_dict(tensors, strict=True, assign=True)
    # The position table is an unsaved buffer, so meta construction left it empty: the same
    # bits as leandit's (checked above), in the model's dtype and device.
    ref = next(iter(tensors.values()))
    pos = _standard_pos_embed(config).to(device=ref.device, dtype=ref.dtype)  # (1, T, D)
    converted.pos_embed.register_buffer("pos_embed", pos, persistent=False)
    _check_materialised(converted)
    converted.eval()
    converted.source = getattr(model, "source", None)
    converted.compression = list(getattr(model, "compression", None) or [])
    converted.leandit_info = leandit_info(config)
    return converted


def diffusers_to_dit(
    model,
    *,
    objective: str | None = None,
    space: str | None = None,
    info: Mapping[str, Any] | None = None,
) -> DiT:
    """A leandit DiT with exactly `model`'s weights (copies).

    `info` defaults to `model.leandit_info` (set by `dit_to_diffusers` or read from
    leandit.json by `load_model`): when it records the time shift the weights were trained
    with, the result is the leandit model they came from (an original DiT: shift 0);
    otherwise, or with `info={}`, the result computes exactly what the diffusers model
    computes. `objective` (default diffusion) and `space` (default latent for 4 channels)
    override the recorded ones. See `dit_config_from_diffusers`.
    """
    cls = _diffusers_class()
    if not isinstance(model, cls):
        raise TypeError(f"diffusers_to_dit takes a diffusers {DIFFUSERS_CLASS}, got {type(model).__name__}")
    if info is None:
        info = getattr(model, "leandit_info", None)
    config = dit_config_from_diffusers(model.config, info=info, objective=objective, space=space)
    tensors = diffusers_state_dict_to_dit(model.state_dict(), config, pos_embed=model.pos_embed.pos_embed)
    dit = model_from_state_dict(config, tensors, source="converted diffusers DiT")
    dit.source = getattr(model, "source", None)
    dit.compression = list(getattr(model, "compression", None) or [])
    return dit


def _standard_pos_embed(config: DiTConfig) -> torch.Tensor:
    """The fixed sin-cos table (1, T, D), as leandit, the original and diffusers compute it."""
    grid = math.isqrt(config.num_tokens)
    return torch.from_numpy(sincos_pos_embed_2d(config.hidden_size, grid)).float().unsqueeze(0)


def _check_materialised(module: torch.nn.Module) -> None:
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"conversion left tensors without values: {left[:5]}")
