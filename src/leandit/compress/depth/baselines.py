"""The baselines of the TinyFusion paper, each a pruning method returning a `PruningDecision`.

Score-based methods (ShortGPT, Flux-Lite, sensitivity) rank blocks and keep the N best of
every group of the scheme; with a one-group scheme ("keep K of L") that is the usual global
ranking. All of them score on the same `CalibrationSet`.

- ShortGPT block influence: BI = 1 - cos(block input, block output) per token, averaged.
- Flux-Lite: mean squared difference between a block's input and output.
- Sensitivity: the calibration loss with the block removed minus the full model's.
- Oracle: keep the first and last blocks and spread the rest evenly between them
  (round(linspace(0, L - 1, K)); 28 -> 14 gives the paper's list).
- Random: draw masks from the scheme; keep the first, or the one with the lowest or the
  median calibration loss (the paper's "min-loss" and "median-loss" random baselines).
- Indices: the blocks the user names.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ...models.blocks import depth_of
from .calibration import CalibrationSet, block_inputs_outputs, calibration_loss
from .decision import PruningDecision, group_records, select_by_scores
from .scheme import Scheme, check_kept, mask_to_indices

SCORE_METHODS = ("shortgpt", "fluxlite", "sensitivity")
RANDOM_PICKS = ("first", "min-loss", "median-loss")


def _token_means(model: nn.Module, calibration: CalibrationSet, per_token, batch_size: int) -> list[float]:
    """Mean over calibration images and tokens of per_token(x_in, x_out) -> (N, T), per block."""
    depth = depth_of(model)
    sums = torch.zeros(depth, dtype=torch.float64)
    counts = torch.zeros(depth, dtype=torch.float64)

    def reduce(index: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        values = per_token(x_in, x_out)  # (N, T)
        sums[index] += float(values.double().sum())
        counts[index] += values.numel()

    block_inputs_outputs(model, calibration, reduce, batch_size)
    return (sums / counts).tolist()


def shortgpt_scores(model: nn.Module, calibration: CalibrationSet, batch_size: int = 256) -> list[float]:
    """Block influence 1 - cos(x_in, x_out) per block: an identity block scores 0."""
    return _token_means(model, calibration, lambda a, b: 1 - torch.nn.functional.cosine_similarity(a, b, dim=-1), batch_size)


def fluxlite_scores(model: nn.Module, calibration: CalibrationSet, batch_size: int = 256) -> list[float]:
    """Mean squared change a block makes to its input: an identity block scores 0."""
    return _token_means(model, calibration, lambda a, b: ((b - a) ** 2).mean(dim=-1), batch_size)


def sensitivity_scores(
    model: nn.Module, calibration: CalibrationSet, batch_size: int = 256, progress: bool = True
) -> list[float]:
    """Increase of the calibration loss when each block alone is removed."""
    depth = depth_of(model)
    full = calibration_loss(model, calibration, batch_size=batch_size)
    scores = []
    for i in tqdm(range(depth), desc="sensitivity", disable=not progress, leave=False):
        kept = [j for j in range(depth) if j != i]
        scores.append(calibration_loss(model, calibration, kept, batch_size) - full)
    return scores


def score_method(
    method: str, model: nn.Module, calibration: CalibrationSet, scheme: Scheme, batch_size: int = 256, progress: bool = True
) -> PruningDecision:
    """Rank the blocks with a score method and keep the best N of every group."""
    if method == "shortgpt":
        scores = shortgpt_scores(model, calibration, batch_size)
    elif method == "fluxlite":
        scores = fluxlite_scores(model, calibration, batch_size)
    elif method == "sensitivity":
        scores = sensitivity_scores(model, calibration, batch_size, progress)
    else:
        raise ValueError(f"unknown score method {method!r}; choose one of {SCORE_METHODS}")
    kept = select_by_scores(scores, scheme)
    return PruningDecision(method, str(scheme), scheme.depth, kept, scores=scores, groups=group_records(scheme, kept))


def oracle_kept(depth: int, keep: int) -> list[int]:
    """First and last block kept, the others spread evenly: round(linspace(0, L - 1, K))."""
    if not 1 <= keep <= depth:
        raise ValueError(f"cannot keep {keep} of {depth} blocks")
    if keep == 1:
        return [0]
    return sorted({int(i) for i in np.round(np.linspace(0, depth - 1, keep))})


def oracle(scheme: Scheme) -> PruningDecision:
    kept = oracle_kept(scheme.depth, scheme.num_kept)
    details = {} if _fits(scheme, kept) else {"note": "the oracle spreads blocks evenly and ignores the scheme's groups"}
    return PruningDecision("oracle", str(scheme), scheme.depth, kept, groups=group_records(scheme, kept), details=details)


def explicit(indices: Sequence[int], depth: int, scheme: Scheme | None = None) -> PruningDecision:
    kept = check_kept(indices, depth)
    if scheme is not None and not _fits(scheme, kept):
        raise ValueError(f"indices {kept} do not fit scheme {scheme}: every group must keep its N blocks")
    label = str(scheme) if scheme else f"{len(kept)} of {depth}"
    return PruningDecision("indices", label, depth, kept, groups=group_records(scheme, kept) if scheme else None)


def random_masks_losses(
    model: nn.Module,
    calibration: CalibrationSet,
    scheme: Scheme,
    count: int,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = True,
) -> tuple[torch.Tensor, list[float]]:
    """`count` masks drawn uniformly from the scheme (with replacement, as independent draws
    are) and their calibration losses; a mask drawn twice is evaluated once."""
    if count < 1:
        raise ValueError(f"the number of random masks must be at least 1, got {count}")
    masks = scheme.random_masks(count, torch.Generator().manual_seed(seed))  # (count, L)
    cache: dict[tuple[int, ...], float] = {}
    losses = []
    for mask in tqdm(masks, desc="random masks", disable=not progress, leave=False):
        kept = tuple(mask_to_indices(mask))
        if kept not in cache:
            cache[kept] = calibration_loss(model, calibration, list(kept), batch_size)
        losses.append(cache[kept])
    return masks, losses


def random_method(
    model: nn.Module,
    calibration: CalibrationSet,
    scheme: Scheme,
    pick: str = "first",
    count: int = 100,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = True,
) -> PruningDecision:
    """A random mask of the scheme: the first drawn, or the min-/median-loss one of `count`."""
    if pick not in RANDOM_PICKS:
        raise ValueError(f"unknown random pick {pick!r}; choose one of {RANDOM_PICKS}")
    if pick == "first":
        mask = scheme.random_masks(1, torch.Generator().manual_seed(seed))[0]
        kept = mask_to_indices(mask)
        return PruningDecision("random", str(scheme), scheme.depth, kept, groups=group_records(scheme, kept), details={"seed": seed})
    masks, losses = random_masks_losses(model, calibration, scheme, count, seed, batch_size, progress)
    order = np.argsort(losses, kind="stable")
    chosen = int(order[0]) if pick == "min-loss" else int(order[(len(order) - 1) // 2])
    kept = mask_to_indices(masks[chosen])
    details = {"pick": pick, "samples": count, "seed": seed, "calibration_loss": losses[chosen],
               "loss_range": [float(min(losses)), float(max(losses))]}
    return PruningDecision(f"random-{pick}", str(scheme), scheme.depth, kept, groups=group_records(scheme, kept), details=details)


def _fits(scheme: Scheme, kept: Sequence[int]) -> bool:
    mask = torch.zeros(scheme.depth)
    mask[list(kept)] = 1.0
    return scheme.fits(mask)
