"""A backbone with token routing (DiffCR, "DiffRatio-MoD"): a router per block and a learned kept
ratio per block and timestep region.

    routed = RoutedModel(load_model("digits-teacher"))   # ratios 1.0: exactly the dense model
    out = routed(x, t, y)                                 # a backbone call
    routed.freeze()                                       # ratios -> a static schedule of k
    backbone(routed).predict(x, t, y)                     # what samplers call

The wrapper owns the routers and the ratios, the backbone keeps its weights; during a forward
the backbone runs its own code with its block list swapped for the `RoutedBlock`s. It wraps a
backbone or another registered wrapper (a DyDiT model made without token routers, an
inpainting model): it then routes the blocks that wrapper runs.

Which capacity each block runs:
- training, no schedule: between the two ratio bins around its ratio, both run and mixed
  (differentiable ratios);
- a schedule (frozen, or loaded from a folder): layer x region -> k, one run per block, static
  shapes;
- evaluation without a schedule: the nearest bin of each ratio (what `freeze` would fix).
Images of a batch in different timestep regions run as separate groups (a sampling batch
shares its t, so it is one group).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ...backbones import backbone
from ...models.blocks import block_list
from ...models.wrappers import peel_wrappers
from .block import MULTIPLIERS, SCALES, RouteGroup, RoutePlan, RoutedBlock
from .ratios import bin_pair, capacity, clamp_ratios, interpolation_weight, nearest_bin, regions_of


@dataclass(frozen=True)
class RoutingSettings:
    """How routing is set up (defaults: the paper's).

    regions: timestep regions with their own ratios (4 of 250 steps; 1 = layer-wise only).
    bins: ratio bins 1/bins .. 1 (10: 0.1, 0.2, .., 1.0).
    scale / multiplier / skipped_kv: see `leandit.compress.routing.block`.
    """

    regions: int = 4
    bins: int = 10
    scale: str = "mlp"
    multiplier: str = "straight-through"
    skipped_kv: bool = False

    def __post_init__(self) -> None:
        if self.regions < 1:
            raise ValueError(f"--regions must be at least 1, got {self.regions}")
        if self.bins < 2:
            raise ValueError(f"--bins must be at least 2 (ratios 1/bins .. 1), got {self.bins}")
        if self.scale not in SCALES:
            raise ValueError(f"--scale must be one of {', '.join(SCALES)}, got {self.scale!r}")
        if self.multiplier not in MULTIPLIERS:
            raise ValueError(f"--multiplier must be one of {', '.join(MULTIPLIERS)}, got {self.multiplier!r}")


class RoutedModel(nn.Module):
    """`model` with a token router per block and kept ratios (L, regions), initialised to 1."""

    varies_with_timestep = True  # its cost depends on t: measured over trajectories

    def __init__(self, model: nn.Module, settings: RoutingSettings = RoutingSettings()):
        super().__init__()
        adapter = backbone(model)
        if getattr(model, "settings", None) is not None and getattr(model.settings, "tokens", False):
            raise ValueError("this DyDiT model already routes tokens (its MLP token routers): route a DyDiT model made "
                             "with --no-tokens, or the dense model")
        self.inner = model
        self.settings = settings
        self.block_list_name = adapter.block_list_names[0]
        self.objective = adapter.spec.objective
        self.num_tokens = adapter.spec.num_tokens
        routed = nn.ModuleList(RoutedBlock(b, settings.scale, settings.multiplier, settings.skipped_kv)
                               for b in block_list(model))
        # Under the backbone's own name, so block_list(self) and hooks on blocks see what runs.
        setattr(self, self.block_list_name, routed)
        self.ratios = nn.Parameter(torch.ones(len(routed), settings.regions))  # (L, R) kept ratios
        # Frozen: the schedule follows the ratios (each at its nearest bin), so a folder's
        # model and EMA weights each come back with their own; an explicit schedule overrides.
        self.frozen = False
        self._explicit_schedule: torch.Tensor | None = None
        self._cached_schedule: tuple[tuple, torch.Tensor] | None = None
        self._static: tuple | None = None  # (schedule, its rows, plans per region, MACs per region)
        self._region: tuple | None = None  # set by at_region: (region, schedule, its plans, its MACs)
        self.last_macs: torch.Tensor | None = None  # (N,) MACs per image of the last forward
        self.mac_log: list[float] | None = None  # when a list: every forward's MACs are appended
        from .macs import RoutedMacs

        self.macs = RoutedMacs.of(self)

    @property
    def routed_blocks(self) -> nn.ModuleList:
        return getattr(self, self.block_list_name)

    @property
    def depth(self) -> int:
        return len(self.routed_blocks)

    def router_parameters(self) -> list[nn.Parameter]:
        return [*self.routed_blocks.parameters(), self.ratios]

    # -- ratios and schedules ----------------------------------------------------------------
    def kept_ratios(self) -> torch.Tensor:
        """The ratios (L, R) as the forward reads them (in [1/bins, 1], differentiable)."""
        return clamp_ratios(self.ratios, self.settings.bins)

    def hard_schedule(self) -> torch.Tensor:
        """Capacities (L, R): each ratio at its nearest bin (what `freeze` fixes)."""
        bins, T = self.settings.bins, self.num_tokens
        ratios = self.kept_ratios().detach().cpu().tolist()
        return torch.tensor([[capacity(nearest_bin(r, bins), bins, T) for r in row] for row in ratios], dtype=torch.long)

    @property
    def schedule(self) -> torch.Tensor | None:
        """The capacities (L, R) inference runs: an explicit schedule, else (frozen) the ratios'
        nearest bins, else None (training interpolates; evaluation reads the nearest bins)."""
        if self._explicit_schedule is not None:
            return self._explicit_schedule
        if not self.frozen:
            return None
        key = (self.ratios._version, self.ratios.data_ptr())
        if self._cached_schedule is None or self._cached_schedule[0] != key:
            self._cached_schedule = (key, self.hard_schedule())
        return self._cached_schedule[1]

    def freeze(self) -> torch.Tensor:
        """Fix the capacities at the ratios' nearest bins: from here on every block runs once per forward."""
        self.frozen = True
        return self.schedule

    def set_schedule(self, schedule: torch.Tensor | list | None) -> None:
        """An explicit capacity schedule (L, R); None: back to the learned ratios, unfrozen."""
        if schedule is None:
            self._explicit_schedule, self.frozen = None, False
            return
        self._explicit_schedule = self.check_schedule(schedule)

    def check_schedule(self, schedule: torch.Tensor | list) -> torch.Tensor:
        """`schedule` as capacities (L, R), or a one-line refusal of one that does not fit."""
        k = torch.as_tensor(schedule, dtype=torch.long).cpu()
        L, R, T = self.depth, self.settings.regions, self.num_tokens
        if k.dim() != 2 or k.shape != (L, R):
            raise ValueError(f"a routing schedule must be {L} blocks x {R} timestep regions of capacities; got shape "
                             f"{tuple(k.shape)} (a schedule of another model, or for a deeper one)")
        if bool((k < 1).any()) or bool((k > T).any()):
            raise ValueError(f"routing capacities must be between 1 and the {T} tokens of this model; got {k.min()}..{k.max()}")
        return k

    def mac_ratio_per_region(self, schedule: torch.Tensor | None = None) -> torch.Tensor:
        """MACs of a schedule (default: the current one, else the nearest bins) / dense, per region (R,)."""
        k = schedule if schedule is not None else (self.schedule if self.schedule is not None else self.hard_schedule())
        return self.macs.ratio(self.macs.total(k))

    def interpolated_mac_ratio(self) -> torch.Tensor:
        """The MAC ratio of the ratios as training runs them (mixed between bins), averaged
        over regions: a differentiable function of the ratios (the MAC budget's)."""
        r = self.kept_ratios()
        bins, T = self.settings.bins, self.num_tokens
        lower = torch.tensor([[bin_pair(v, bins)[0] for v in row] for row in r.detach().cpu().tolist()])  # (L, R)
        k_lo = torch.tensor([[capacity(b, bins, T) for b in row] for row in lower.tolist()], device=r.device)
        k_hi = torch.tensor([[capacity(b + 1, bins, T) for b in row] for row in lower.tolist()], device=r.device)
        w = interpolation_weight(r.double(), lower.to(r.device), bins)
        blocks = (1 - w) * self.macs.blocks(k_lo) + w * self.macs.blocks(k_hi)  # (L, R)
        return self.macs.ratio(self.macs.fixed + blocks.sum(0)).mean()

    # -- running -----------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]  # diffusers' call or (x, t, y)
        plans, macs, tokens = self._plans(t)
        blocks = self.routed_blocks
        for block, plan in zip(blocks, plans):
            block.plan = plan
        try:
            with self._running_routed_blocks():
                out = self.inner(*args, **kwargs)
        finally:
            for block in blocks:
                block.plan = None
        widths = getattr(self.inner, "last_widths", None)
        if widths is not None:  # around a DyDiT model: its widths at the tokens each block ran on
            heads, channels = widths
            routers = self.depth * self.routed_blocks[0].hidden_size * self.num_tokens
            macs = self.inner.macs.routed(heads, channels, tokens.to(heads.device)).cpu() + routers
        self.last_macs = macs
        if self.mac_log is not None:  # a measurement is counting (leandit bench)
            self.mac_log.append(float(macs.sum()))
        return out

    def _plans(self, t: torch.Tensor) -> tuple[list[RoutePlan], torch.Tensor, torch.Tensor]:
        """Each block's plan, the MACs (N,) per image it implies and the tokens (N, L) each
        image runs each block on (in training: the interpolation's mean of the two capacities)."""
        R, bins, T = self.settings.regions, self.settings.bins, self.num_tokens
        if self._region is not None:
            g, k, region_plans, region_macs = self._region
            n = t.reshape(-1).shape[0]
            return region_plans[g], region_macs[g].expand(n), k[:, g].expand(n, -1).double()
        regions = regions_of(t.reshape(-1), R, self.objective)
        on_host = regions.cpu()  # one host transfer per forward
        present = sorted(set(on_host.tolist()))
        images = {g: None for g in present} if len(present) == 1 else {
            g: (regions == g).nonzero().squeeze(1) for g in present}
        if self.training and self.schedule is None:
            r = self.kept_ratios()
            values = r.detach().cpu().tolist()
            plans, macs, tokens = [], torch.zeros(R, dtype=torch.float64), torch.zeros(self.depth, R, dtype=torch.float64)
            for layer in range(self.depth):
                groups = []
                for g in present:
                    lower, upper = bin_pair(values[layer][g], bins)
                    k_lo, k_hi = capacity(lower, bins, T), capacity(upper, bins, T)
                    w = interpolation_weight(r[layer, g], lower, bins)
                    if k_lo == k_hi:
                        groups.append(RouteGroup(images[g], [(k_lo, None)]))
                    else:
                        groups.append(RouteGroup(images[g], [(k_lo, 1 - w), (k_hi, w)]))
                    wv = float(w.detach())
                    macs[g] += (1 - wv) * self._block_macs(layer, k_lo) + wv * self._block_macs(layer, k_hi)
                    tokens[layer, g] = (1 - wv) * k_lo + wv * k_hi
                plans.append(RoutePlan(groups))
            return plans, (self.macs.fixed + macs)[on_host], tokens[:, on_host].T
        k = self.schedule if self.schedule is not None else self.hard_schedule()  # (L, R)
        rows, region_plans, region_macs = self._static_plans(k)
        if len(present) == 1:  # a sampling batch: plans made once per schedule, reused
            g = present[0]
            return region_plans[g], region_macs[g].expand(len(on_host)), k[:, on_host].T.double()
        plans = [RoutePlan([RouteGroup(images[g], [(rows[layer][g], None)]) for g in present]) for layer in range(self.depth)]
        return plans, region_macs[on_host], k[:, on_host].T.double()

    def _static_plans(self, k: torch.Tensor) -> tuple[list[list[int]], list[list[RoutePlan]], torch.Tensor]:
        """For schedule k (L, R): its rows as Python ints, each region's plans (the same objects
        every forward, so a compiled model's guards hold) and each region's MACs (R,)."""
        if self._static is None or self._static[0] is not k:
            rows = k.tolist()
            plans = [[RoutePlan([RouteGroup(None, [(rows[layer][g], None)])]) for layer in range(self.depth)]
                     for g in range(self.settings.regions)]
            self._static = (k, rows, plans, self.macs.total(k))
        return self._static[1:]

    @contextlib.contextmanager
    def at_region(self, region: int) -> Iterator["RoutedModel"]:
        """Within: every image of every forward is in timestep region `region` (a sampler that
        knows its t), so a scheduled forward needs no host sync and `torch.compile` traces it
        whole, one graph per region: `with routed.at_region(g): compiled(x, t, y)`."""
        if not 0 <= region < self.settings.regions:
            raise ValueError(f"region {region} is outside 0..{self.settings.regions - 1}")
        if self.training and self.schedule is None:
            raise ValueError("at_region runs a schedule: freeze the model (or evaluate it) first")
        # Everything the forward reads is made here, eagerly: the compiled forward only reads it.
        k = self.schedule if self.schedule is not None else self.hard_schedule()
        _, plans, macs = self._static_plans(k)
        previous, self._region = self._region, (region, k, plans, macs)
        try:
            yield self
        finally:
            self._region = previous

    def _block_macs(self, layer: int, k: int) -> float:
        c0, c1, c2 = self.macs.coefficients[layer].tolist()
        return c0 + c1 * k + c2 * k * k

    @contextlib.contextmanager
    def _running_routed_blocks(self) -> Iterator[None]:
        name = self.block_list_name
        if hasattr(self.inner, "block_overlay"):
            # A wrapper that installs its own blocks (DyDiT) installs these (which call its blocks).
            object.__setattr__(self.inner, "block_overlay", self.routed_blocks)
            try:
                yield
            finally:
                object.__setattr__(self.inner, "block_overlay", None)
            return
        owner = peel_wrappers(self.inner)[0]
        own = owner._modules[name]
        # Shared for the call only: the backbone's own list (its state dict, its folder) never
        # holds the routers.
        owner._modules[name] = self.routed_blocks
        try:
            yield
        finally:
            owner._modules[name] = own

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Within: every block keeps the token indices it ran on in the last forward (`kept`,
        still readable after the context, until the next forward)."""
        for block in self.routed_blocks:
            block.record = True
        try:
            yield
        finally:
            for block in self.routed_blocks:
                block.record = False

    # -- what it is --------------------------------------------------------------------------
    def ratio_table(self) -> dict[str, Any]:
        """The learned ratios (L x R), the schedule (L x R capacities) and what it costs."""
        schedule = self.schedule if self.schedule is not None else self.hard_schedule()
        return {
            "regions": self.settings.regions,
            "bins": self.settings.bins,
            "tokens": self.num_tokens,
            "ratios": [[round(v, 4) for v in row] for row in self.kept_ratios().detach().cpu().tolist()],
            "schedule": schedule.tolist(),
            "macs_ratio_per_region": [round(v, 4) for v in self.mac_ratio_per_region(schedule).tolist()],
        }

    def summary(self) -> dict[str, Any]:
        """Settings and the schedule (for `leandit info`)."""
        table = self.ratio_table()
        schedule = torch.tensor(table["schedule"], dtype=torch.float64)
        return {
            "method": "DiffCR",
            "settings": {k: getattr(self.settings, k) for k in ("regions", "bins", "scale", "multiplier", "skipped_kv")},
            "frozen": self.schedule is not None,
            # Around a DyDiT model the MACs here are token routing's alone, at full width.
            "around": "DyDiT" if hasattr(self.inner, "last_widths") else None,
            "tokens": self.num_tokens,
            "schedule": table["schedule"],
            "mean_kept_per_layer": [round(v, 2) for v in schedule.mean(1).tolist()],
            "macs_ratio_per_region": table["macs_ratio_per_region"],
            "macs_ratio": round(sum(table["macs_ratio_per_region"]) / len(table["macs_ratio_per_region"]), 4),
        }
