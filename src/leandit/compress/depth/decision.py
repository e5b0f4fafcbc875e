"""What every depth-pruning method returns: which blocks to keep, and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from .scheme import Scheme, check_kept


@dataclass
class PruningDecision:
    """The outcome of a pruning method, ready to export and to record in compression.json.

    Args:
        method: the method's name ("learnable", "shortgpt", ...).
        scheme: the N:M scheme the choice was made under (or "K of L" for a global choice).
        depth: blocks of the source model.
        kept: the kept block indices, ascending.
        scores: per-block importance when the method ranks blocks (higher = more worth
            keeping), in the method's own unit.
        groups: per group of the scheme: its layers, kept layers, and (learnable) the
            confidence of the decision.
        details: anything else the method wants remembered (steps run, hyperparameters,
            random-search losses, ...).
    """

    method: str
    scheme: str
    depth: int
    kept: list[int]
    scores: list[float] | None = None
    groups: list[dict[str, Any]] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kept = check_kept(self.kept, self.depth)

    @property
    def removed(self) -> list[int]:
        return [i for i in range(self.depth) if i not in set(self.kept)]

    def record(self) -> dict[str, Any]:
        """The JSON-able part of compression.json that describes this decision."""
        record: dict[str, Any] = {
            "method": self.method,
            "scheme": self.scheme,
            "source_depth": self.depth,
            "kept_indices": self.kept,
            "removed_indices": self.removed,
        }
        if self.groups is not None:
            record["groups"] = self.groups
        if self.scores is not None:
            record["scores"] = [round(float(s), 8) for s in self.scores]
        record.update(self.details)
        return record


def group_records(scheme: Scheme, kept: Sequence[int], confidences: Sequence[float] | None = None) -> list[dict[str, Any]]:
    kept_set = set(kept)
    records = []
    for index, group in enumerate(scheme.groups):
        record: dict[str, Any] = {"layers": group.layers, "keep": group.n, "kept": [i for i in group.layers if i in kept_set]}
        if confidences is not None:
            record["confidence"] = round(float(confidences[index]), 6)
        records.append(record)
    return records


def select_by_scores(scores: Sequence[float], scheme: Scheme) -> list[int]:
    """In every group keep the N highest-scored blocks; ties keep the earlier block."""
    if len(scores) != scheme.depth:
        raise ValueError(f"{len(scores)} scores for a scheme over {scheme.depth} blocks")
    kept = []
    for group in scheme.groups:
        ranked = sorted(group.layers, key=lambda i: (-float(scores[i]), i))
        kept.extend(sorted(ranked[: group.n]))
    return sorted(kept)

