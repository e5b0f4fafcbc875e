"""`leandit sample`'s sampler options: SiT's SDE and ODE settings, the multistep solvers'
spacing and shift, and step caching; each parsed into its settings, and refused where it does
not apply (an option for another sampler, a flow shift for a diffusion model)."""

from __future__ import annotations

import argparse

from ..compress.step_cache import CacheSettings
from ..diffusion.sit_samplers import LAST_STEPS, SDE_FORMS, ODESettings, SDESettings
from ..diffusion.solvers import SOLVERS, SPACINGS, SolverSettings


def add_sampler_options(parser: argparse.ArgumentParser) -> None:
    """The option groups of SiT's samplers, step caching and the multistep solvers."""
    sit = parser.add_argument_group("SiT's samplers (--sampler sde / dopri5; defaults: SiT's sample.py)")
    sit.add_argument("--sde-form", choices=SDE_FORMS, default=None, help="form of the SDE's diffusion w(t) (default sigma: 1 - t)")
    sit.add_argument("--sde-norm", type=float, default=None, help="multiplier of w(t) (default 1)")
    sit.add_argument("--last-step", choices=LAST_STEPS, default=None,
                     help="the SDE's last step: mean (drift, no noise), tweedie (posterior mean), euler (velocity) or "
                     "none (integrate to t = 1) (default mean)")
    sit.add_argument("--last-step-size", type=float, default=None, help="size of the last step (default 0.04)")
    sit.add_argument("--sample-eps", type=float, default=None, help="start of the SBDM form's time grid (default 0; SBDM needs > 0)")
    sit.add_argument("--atol", type=float, default=None, help="dopri5 absolute tolerance (default 1e-6)")
    sit.add_argument("--rtol", type=float, default=None, help="dopri5 relative tolerance (default 1e-3)")
    cache = parser.add_argument_group("step caching (training-free; composes with pruned, DyDiT and DiffCR models)")
    cache.add_argument("--cache-interval", type=int, default=None,
                       help="run every block only every N-th model call and reuse each block's update in between "
                       "(FORA-style; 1 = no caching)")
    cache.add_argument("--cache-warmup", type=int, default=None, help="first model calls of each trajectory that always run in full (default 1)")
    fast = parser.add_argument_group("multistep solvers (--sampler dpm++2m / unipc; defaults: diffusers')")
    fast.add_argument("--spacing", choices=SPACINGS, default=None, help="diffusers' timestep spacing (default linspace)")
    fast.add_argument("--karras", action="store_true", default=None, help="Karras et al.'s sigma spacing instead")
    fast.add_argument("--flow-shift", type=float, default=None,
                      help="flow models, also with euler and heun: shift of the flow-matching sigmas, s sigma / (1 + (s - 1) "
                      "sigma) (SD3: 3; default 1 = none)")


def sit_sampler_settings(args: argparse.Namespace, sampler: str) -> tuple[SDESettings | None, ODESettings | None]:
    """The SDE or ODE settings of --sampler sde / dopri5 from the options (SiT's defaults for
    those not given); an option for the other sampler, or for none, is refused."""
    sde_given = {k: getattr(args, a) for k, a in (("form", "sde_form"), ("norm", "sde_norm"), ("last_step", "last_step"),
                                                   ("last_step_size", "last_step_size"), ("sample_eps", "sample_eps"))
                 if getattr(args, a) is not None}
    ode_given = {k: getattr(args, k) for k in ("atol", "rtol") if getattr(args, k) is not None}
    for given, owner in ((sde_given, "sde"), (ode_given, "dopri5")):
        if given and sampler != owner:
            names = ", ".join("--" + (k if owner == "dopri5" else {"form": "sde-form", "norm": "sde-norm"}.get(k, k)).replace("_", "-")
                              for k in given)
            raise ValueError(f"{names} apply to --sampler {owner}, not {sampler}")
    sde = SDESettings(**sde_given) if sampler == "sde" else None
    ode = ODESettings(**ode_given) if sampler == "dopri5" else None
    return sde, ode


def cache_settings(args: argparse.Namespace) -> CacheSettings | None:
    """--cache-interval/--cache-warmup as settings; None without caching."""
    if args.cache_interval is None:
        if args.cache_warmup is not None:
            raise ValueError("--cache-warmup applies with --cache-interval")
        return None
    return CacheSettings(args.cache_interval, 1 if args.cache_warmup is None else args.cache_warmup)


def solver_settings(args: argparse.Namespace, sampler: str, objective: str) -> SolverSettings | None:
    """The multistep solvers' settings (diffusers' defaults for those not given); refused for
    other samplers, and --flow-shift for diffusion models."""
    given = {k: getattr(args, k) for k in ("spacing", "karras", "flow_shift") if getattr(args, k) is not None}
    if "flow_shift" in given and objective != "flow":
        raise ValueError(f"--flow-shift applies to flow (SiT) models; this one is a {objective} model")
    shifted = sampler in ("euler", "heun") and objective == "flow"  # SD3's shifted flow-matching schedule
    spacing = [k for k in given if k != "flow_shift"]
    if (spacing and sampler not in SOLVERS) or (given and sampler not in SOLVERS and not shifted):
        names = ", ".join("--" + k.replace("_", "-") for k in (spacing or given))
        raise ValueError(f"{names} apply to --sampler dpm++2m or unipc{' (--flow-shift also to euler and heun)' if not spacing else ''}, "
                         f"not {sampler}")
    if sampler in SOLVERS or (shifted and given):
        return SolverSettings(**given)
    return None
