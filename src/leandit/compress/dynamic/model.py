"""A backbone made dynamic (DyDiT): width routers per block on the timestep embedding (TDW),
token routers before each MLP (SDT), one module holding the backbone and every router.

    dynamic = DynamicModel(load_model("DiT-XL-2-256x256.pt"))     # starts exactly dense
    out = dynamic(x, t, y)                                         # a backbone call
    backbone(dynamic).predict(x, t, y)                             # what samplers call

The wrapper owns the routers, the backbone keeps its weights: the model folder stores the
backbone as usual plus the routers and the per-timestep width table (`leandit.models.wrappers`).
During a forward the backbone runs its own code with its block list swapped for the
`DynamicBlock`s (which call the original blocks' branches), so the backbone's embedders,
final layer and conditioning are never re-implemented.

In training, decisions are Gumbel-sigmoid straight-through masks whose noise comes from the
training step's randomness (`router_noise`, uniforms of `noise_size` per image), so runs
resume exactly. In inference the width of every block is a function of t alone: decisions
are made once per forward for all blocks together (one host sync) and images that share t
(both halves of a guidance batch, a whole sampling batch) share one set of sliced weights.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ...backbones import backbone
from ...models.blocks import block_list
from .block import BlockPlan, DynamicBlock
from .routers import decide, with_always_on


@dataclass(frozen=True)
class DynamicSettings:
    """What is dynamic. width: timestep-wise heads and MLP groups (TDW); tokens: per-token MLP
    skipping (SDT); tau: the Gumbel-sigmoid temperature of training (the paper's 5)."""

    width: bool = True
    tokens: bool = True
    tau: float = 5.0

    def __post_init__(self) -> None:
        if not (self.width or self.tokens):
            raise ValueError("nothing is dynamic: enable dynamic width, dynamic tokens or both")
        if not (self.tau > 0):
            raise ValueError(f"the router temperature must be positive, got {self.tau}")

    @property
    def label(self) -> str:
        return "+".join(name for name, on in (("TDW", self.width), ("SDT", self.tokens)) if on)


class DynamicModel(nn.Module):
    """`backbone_model` with DyDiT routers; `forward` takes the backbone's own arguments plus
    `router_noise` (N, noise_size) uniforms in training and `dense=True` to run the plain
    backbone (the first stage's loss on the unmasked model)."""

    varies_with_timestep = True  # its cost depends on t (and on the tokens): measure trajectories

    def __init__(self, backbone_model: nn.Module, settings: DynamicSettings = DynamicSettings()):
        super().__init__()
        adapter = backbone(backbone_model)
        if settings.width:
            adapter.check_timestep_embedding()
        self.backbone = backbone_model
        self.settings = settings
        self.block_list_name = adapter.block_list_names[0]
        dynamic = nn.ModuleList(
            dynamic_block_for(block)(block, width=settings.width, tokens=settings.tokens, tau=settings.tau)
            for block in block_list(backbone_model)
        )
        # Under the backbone's own name, so block_list(self) and hooks on blocks see what runs.
        setattr(self, self.block_list_name, dynamic)
        first = dynamic[0]
        self.num_heads, self.num_groups, self.group_size = first.num_heads, first.num_groups, first.group_size
        self.num_tokens = adapter.spec.num_tokens
        self.last_macs: torch.Tensor | None = None  # (N,) MACs per image of the last forward
        self.last_widths: tuple[torch.Tensor, torch.Tensor] | None = None
        self.mac_log: list[float] | None = None  # when a list: every forward's MACs are appended
        # Blocks an outer wrapper runs in place of the dynamic blocks (calling them); not a child.
        object.__setattr__(self, "block_overlay", None)
        from .macs import MacCounter

        self.macs = MacCounter.of(self)

    @property
    def dynamic_blocks(self) -> nn.ModuleList:
        return getattr(self, self.block_list_name)

    @property
    def depth(self) -> int:
        return len(self.dynamic_blocks)

    @property
    def noise_size(self) -> int:
        """Uniforms per image that one training forward consumes."""
        width = 2 * (self.num_heads - 1) if self.settings.width else 0
        tokens = self.num_tokens if self.settings.tokens else 0
        return self.depth * (width + tokens)

    def slice_cache_capacity(self, patterns: int) -> None:
        """Keep at most `patterns` sliced width patterns per block (inference memory vs re-slicing)."""
        from .slices import SliceCache

        for block in self.dynamic_blocks:
            block._slices = SliceCache(patterns)

    def router_parameters(self) -> list[nn.Parameter]:
        return list(self.dynamic_blocks.parameters())

    # -- decisions ---------------------------------------------------------------------------
    def width_logits(self, t_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head and group logits (N, L, H-1), (N, L, G-1) of every block for t_emb (N, D)."""
        heads, groups = zip(*(block.width_routers(t_emb) for block in self.dynamic_blocks))
        return torch.stack(heads, dim=1), torch.stack(groups, dim=1)

    def width_decisions(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference decisions (N, L, H) and (N, L, G) as bools (head 0 and group 0 on) at t."""
        n, L = t.shape[0], self.depth
        if not self.settings.width:
            on = torch.ones(n, L, self.num_heads, dtype=torch.bool, device=t.device)
            return on, on.clone()
        with torch.no_grad():
            heads, groups = self.width_logits(backbone(self.backbone).timestep_embedding(t))
        return with_always_on(heads > 0), with_always_on(groups > 0)

    def _plans(self, t: torch.Tensor, router_noise: torch.Tensor | None) -> tuple[list[BlockPlan], torch.Tensor, torch.Tensor]:
        """Each block's plan and the heads and channels (N, L) it keeps (differentiable in training)."""
        n, L, H, T = t.shape[0], self.depth, self.num_heads, self.num_tokens
        noise = _split_noise(router_noise, n, L, H - 1 if self.settings.width else 0, T if self.settings.tokens else 0)
        if self.training:
            if self.settings.width:
                head_logits, group_logits = self.width_logits(backbone(self.backbone).timestep_embedding(t))
                heads = with_always_on(decide(head_logits, True, self.settings.tau, noise["heads"]))  # (N, L, H)
                groups = with_always_on(decide(group_logits, True, self.settings.tau, noise["groups"]))  # (N, L, G)
                channels = groups.repeat_interleave(self.group_size, dim=-1)  # (N, L, Dm)
                plans = [BlockPlan(heads[:, i], channels[:, i], _at(noise["tokens"], i)) for i in range(L)]
                return plans, heads.sum(-1).double(), groups.sum(-1).double() * self.group_size
            plans = [BlockPlan(token_noise=_at(noise["tokens"], i)) for i in range(L)]
            full = torch.full((n, L), float(H), device=t.device, dtype=torch.float64)
            return plans, full, full * self.group_size
        heads, groups = self.width_decisions(t)
        keys = torch.cat([heads, groups], dim=-1).cpu()  # (N, L, H + G): one host transfer per forward
        plans = [BlockPlan(patterns=_patterns(keys[:, i], H, t.device)) for i in range(L)]
        return plans, heads.sum(-1).double(), groups.sum(-1).double() * self.group_size

    # -- running -----------------------------------------------------------------------------
    def forward(self, *args: Any, router_noise: torch.Tensor | None = None, dense: bool = False, **kwargs: Any) -> Any:
        if dense:
            return self.backbone(*args, **kwargs)
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]  # diffusers' call or (x, t, y)
        plans, heads, channels = self._plans(t, router_noise)
        blocks = self.dynamic_blocks
        for block, plan in zip(blocks, plans):
            block.plan = plan
        try:
            with self._running_dynamic_blocks():
                out = self.backbone(*args, **kwargs)
        finally:
            for block in blocks:
                block.plan = None
        kept = [b.kept_tokens for b in blocks]
        tokens = torch.stack(kept, dim=1) if self.settings.tokens else torch.ones_like(heads)  # (N, L)
        self.last_widths = (heads.detach(), channels.detach())  # (N, L) kept heads and MLP channels
        self.last_macs = self.macs.dynamic(heads, channels, tokens.double())
        if self.mac_log is not None:  # a measurement is counting (leandit bench)
            self.mac_log.append(float(self.last_macs.sum()))
        return out

    @contextlib.contextmanager
    def _running_dynamic_blocks(self) -> Iterator[None]:
        name = self.block_list_name
        own = getattr(self.backbone, name)
        # The ModuleList object is shared for the call only; the backbone's own list (and so
        # its state dict and its folder) never holds the routers.
        # An outer wrapper (token routing) may install its blocks, which call these.
        self.backbone._modules[name] = self.block_overlay if self.block_overlay is not None else self.dynamic_blocks
        try:
            yield
        finally:
            self.backbone._modules[name] = own

    # -- the width table ---------------------------------------------------------------------
    def width_table(self, timesteps: torch.Tensor | None = None) -> dict[str, Any]:
        """Which heads and groups run at each timestep: {"timesteps": [...], "heads": L x T
        bitmasks, "groups": L x T bitmasks} (bit k set = head / group k runs)."""
        if timesteps is None:
            timesteps = default_timesteps(backbone(self.backbone).spec.objective)
        device = next(self.parameters()).device
        heads, groups = self.width_decisions(timesteps.to(device))  # (T, L, H)
        weights = 2 ** torch.arange(self.num_heads, device=device)
        return {
            "timesteps": timesteps.tolist(),
            "heads": (heads.long() * weights).sum(-1).T.tolist(),  # (L, T)
            "groups": (groups.long() * weights).sum(-1).T.tolist(),
        }

    def summary(self) -> dict[str, Any]:
        """Settings and the mean width over the trained timesteps (for `leandit info`)."""
        table = self.width_table()
        heads = torch.tensor(table["heads"])
        groups = torch.tensor(table["groups"])
        count = lambda masks: sum(((masks >> k) & 1) for k in range(self.num_heads)).float()  # noqa: E731
        return {
            "method": "DyDiT",
            "dynamic": self.settings.label,
            "tau": self.settings.tau,
            "heads": self.num_heads,
            "groups": self.num_groups,
            "mean_heads_per_layer": [round(v, 2) for v in count(heads).mean(1).tolist()],
            "mean_groups_per_layer": [round(v, 2) for v in count(groups).mean(1).tolist()],
            "width_macs_ratio_all_tokens": round(self.macs.width_table_ratio(count(heads), count(groups)), 4),
        }


# (block class, its dynamic wrapper): one row per kind of block DyDiT can run dynamically.
DYNAMIC_BLOCKS: list[tuple[type, type]] = []


def register_dynamic_block(block_type: type, dynamic_type: type) -> None:
    DYNAMIC_BLOCKS.append((block_type, dynamic_type))


def dynamic_block_for(block: nn.Module) -> type:
    for block_type, dynamic_type in DYNAMIC_BLOCKS:
        if isinstance(block, block_type):
            return dynamic_type
    known = ", ".join(b.__name__ for b, _ in DYNAMIC_BLOCKS)
    raise ValueError(f"DyDiT cannot run a {type(block).__name__} block dynamically (it knows {known})")


def default_timesteps(objective: str) -> torch.Tensor:
    """The timesteps a model is trained on: 0..999 for DiT's diffusion; 1000 points of [0, 1]
    for a flow model (its t is continuous)."""
    if objective == "flow":
        return torch.linspace(0, 1, 1000)
    return torch.arange(1000)


def _split_noise(noise: torch.Tensor | None, n: int, layers: int, per_router: int, tokens: int) -> dict[str, torch.Tensor | None]:
    if noise is None:
        return {"heads": None, "groups": None, "tokens": None}
    expected = layers * (2 * per_router + tokens)
    if noise.shape != (n, expected):
        raise ValueError(f"router noise must be (batch, {expected}) uniforms, got {tuple(noise.shape)}")
    a, b = layers * per_router, 2 * layers * per_router
    return {
        "heads": noise[:, :a].reshape(n, layers, per_router) if per_router else None,
        "groups": noise[:, a:b].reshape(n, layers, per_router) if per_router else None,
        "tokens": noise[:, b:].reshape(n, layers, tokens) if tokens else None,
    }


def _at(noise: torch.Tensor | None, i: int) -> torch.Tensor | None:
    return None if noise is None else noise[:, i]


def _patterns(keys: torch.Tensor, num_heads: int, device: torch.device) -> list[tuple[tuple, torch.Tensor | None]]:
    """Images grouped by width pattern: [((kept heads, kept groups), image indices or None = all)]
    from one block's decisions (N, H + G) on the host."""
    if bool((keys == keys[:1]).all()):
        return [(_pattern(keys[0], num_heads), None)]
    found: dict[tuple, list[int]] = {}
    for i, row in enumerate(keys):
        found.setdefault(_pattern(row, num_heads), []).append(i)
    return [(key, torch.tensor(images, device=device)) for key, images in found.items()]


def _pattern(row: torch.Tensor, num_heads: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    kept = row.nonzero().squeeze(1).tolist()
    return tuple(k for k in kept if k < num_heads), tuple(k - num_heads for k in kept if k >= num_heads)
