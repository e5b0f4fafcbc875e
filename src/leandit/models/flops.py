"""Parameter and FLOP counts of a forward pass, attention included.

Counted with `torch.utils.flop_counter` on a copy of the model on the meta device (no memory,
no arithmetic), so even DiT-XL/2 is counted in well under a second. The DiT paper's
"Gflops" are multiply-accumulates (MACs): DiT-XL/2 at 256px is 118.6 GMACs = 237 GFLOPs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop

_REGISTERED = False


def _register_cpu_attention() -> None:
    """The CPU flash-attention kernel has no FLOP formula in torch: without one, attention
    on real CPU tensors counts as zero. Its arguments match the generic SDPA formula."""
    global _REGISTERED
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if _REGISTERED or op is None:
        return
    try:

        @register_flop_formula(op)
        def _cpu_flash_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop(query_shape, key_shape, value_shape)

    except RuntimeError:  # already registered by a newer torch
        pass
    _REGISTERED = True


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, batch_size: int = 1) -> int:
    """FLOPs (2 per multiply-accumulate) of one forward of a backbone at `batch_size` (text
    models at the adapter's example prompt length)."""
    from ..backbones import backbone, unwrap

    if getattr(unwrap(model), "varies_with_timestep", False):
        raise ValueError("a dynamic model's FLOPs depend on the timestep and the image: count them over a sampling "
                         "trajectory (`leandit bench --trajectory STEPS`), or count its dense backbone")
    if backbone(model).spec.objective == "masked":
        return _mar_forward_flops(model, batch_size)
    _register_cpu_attention()
    meta_model = _meta_copy(model)
    adapter = backbone(meta_model)
    x, t, cond = adapter.example_inputs(batch_size, "meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        adapter.predict(x, t, cond)
    return int(counter.get_total_flops())


def _meta_copy(model: nn.Module) -> nn.Module:
    """The same module structure with meta tensors (a deep copy that allocates nothing)."""
    memo: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


# -- MAR: the generation loop and the training forward, counted piece by piece ------------------
# MAR's encoder keeps only the known tokens (a boolean index whose size depends on the mask),
# which the meta device cannot run; its cost depends only on how many tokens are known, so the
# pieces are counted on meta tensors of the shapes each call has.


def generation_schedule(num_iter: int, seq_len: int) -> list[dict[str, int]]:
    """MAR's unmasking loop as `MaskedDiffusion.generate` runs it: for every step that
    predicts tokens, {"step", "known" (tokens the encoder sees), "predicted" (head rows per
    image), "after" (unknown after it, the count the linear guidance uses)}."""
    from ..diffusion.masked import unknown_after_step

    if not 1 <= num_iter <= seq_len:
        raise ValueError(f"MAR generation needs 1 to {seq_len} steps, got {num_iter}")
    steps, unknown = [], seq_len
    for step in range(num_iter):
        after = unknown_after_step(step, num_iter, seq_len, unknown)
        left = 0 if step == num_iter - 1 else after
        if unknown - left > 0:
            steps.append({"step": step, "known": seq_len - unknown, "predicted": unknown - left, "after": after})
        unknown = left
    return steps


class _MetaCounter:
    """MACs of MAR's pieces on meta tensors, cached per shape (a pruned list counts only the
    blocks it has)."""

    def __init__(self, model: nn.Module):
        _register_cpu_attention()
        self.model = _meta_copy(model)
        self.config = self.model.config
        self._cache: dict[tuple, int] = {}

    def _count(self, key: tuple, call) -> int:
        if key not in self._cache:
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                call()
            self._cache[key] = int(counter.get_total_flops()) // 2
        return self._cache[key]

    def _blocks(self, name: str, x: torch.Tensor) -> int:
        """All blocks of a list on x; blocks of one shape are counted once (a list of 16
        alike costs one count per token count, not 16)."""
        blocks = getattr(self.model, name)
        total, seen = 0, {}
        for block in blocks:
            shape = tuple((k, tuple(v.shape)) for k, v in block.state_dict().items())
            if shape not in seen:
                seen[shape] = self._count((name, shape, tuple(x.shape)), lambda: block(x))
            total += seen[shape]
        return total

    def encoder(self, n: int, known: int) -> int:
        """The encoder blocks on the buffer + known tokens (N, B + K, D)."""
        c = self.config
        return self._blocks("encoder_blocks", torch.empty(n, c.buffer_size + known, c.hidden_size, device="meta"))

    def decoder(self, n: int) -> int:
        c = self.config
        return self._blocks("decoder_blocks", torch.empty(n, c.buffer_size + c.num_tokens, c.decoder_hidden_size, device="meta"))

    def other(self, n: int, known: int) -> int:
        """The rest of a context call: z_proj on every token, decoder_embed on the encoder's output."""
        c = self.config
        tokens = torch.empty(n, c.num_tokens, c.token_dim, device="meta")
        encoded = torch.empty(n, c.buffer_size + known, c.hidden_size, device="meta")
        return self._count(("other", n, known), lambda: (self.model.z_proj(tokens), self.model.decoder_embed(encoded)))

    def head(self, rows: int) -> int:
        """One head call on `rows` tokens."""
        c = self.config
        x = torch.empty(rows, c.token_dim, device="meta")
        t = torch.zeros(rows, dtype=torch.long, device="meta")
        z = torch.empty(rows, c.decoder_hidden_size, device="meta")
        return self._count(("head", rows), lambda: self.model.head(x, t, z))


def mar_step_macs(model: nn.Module, batch_size: int = 1, *, num_iter: int = 64, head_steps: int | str | None = None,
                  guided: bool = False) -> list[dict[str, int]]:
    """MACs of each step of MAR's generation loop for `batch_size` images: the schedule's
    entries (`generation_schedule`) with "blocks", "head" and "other" added (see
    `mar_generation_macs`)."""
    from ..backbones import backbone

    inner = backbone(model).model
    c = inner.config
    from ..diffusion.masked import head_step_count

    head_steps = head_step_count(head_steps or c.head_sampling_steps, c.head_timesteps)
    n = 2 * batch_size if guided else batch_size
    counter = _MetaCounter(inner)
    return [{**s, "blocks": counter.encoder(n, s["known"]) + counter.decoder(n), "other": counter.other(n, s["known"]),
             "head": head_steps * counter.head(n * s["predicted"])}
            for s in generation_schedule(num_iter, c.num_tokens)]


def mar_generation_macs(model: nn.Module, batch_size: int = 1, *, num_iter: int = 64, head_steps: int | str | None = None,
                        guided: bool = False) -> dict[str, int]:
    """MACs of MAR's whole generation loop for `batch_size` images: "blocks" (encoder and
    decoder blocks over every step), "head" (every DDPM step of the head on every predicted
    token), "other" (the context's token and decoder embeddings) and "total". With guidance
    the context and the head run on twice the batch (conditional and unconditional halves).
    Norms, position embeddings and the DDPM arithmetic are not counted (as for DiT)."""
    steps = mar_step_macs(model, batch_size, num_iter=num_iter, head_steps=head_steps, guided=guided)
    parts = {part: sum(s[part] for s in steps) for part in ("blocks", "head", "other")}
    return {**parts, "total": sum(parts.values())}


def _mar_forward_flops(model: nn.Module, batch_size: int) -> int:
    """FLOPs of a training forward at the shapes of `example_inputs` (the median mask ratio,
    each unknown token once in the head)."""
    from ..backbones import backbone

    adapter = backbone(model)
    inputs, _, _ = adapter.example_inputs(batch_size, "cpu")
    c = adapter.model.config
    unknown = int(inputs.mask[0].sum())
    counter = _MetaCounter(adapter.model)
    known = c.num_tokens - unknown
    macs = (counter.encoder(batch_size, known) + counter.decoder(batch_size) + counter.other(batch_size, known)
            + counter.head(inputs.index.numel()))
    return 2 * macs
