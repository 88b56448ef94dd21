"""What a budget means above the published ones: the schedules reach it.

Methods with published schedules (PyramidDrop, HiMAP, SparseVLM: {budget of 576: visual tokens kept after each
stage}) take them as published at those budgets, interpolated between them and scaled in proportion below the
smallest (`press.schedule_for_budget`). Above the largest published budget, scaling in proportion falls short
of the budget (the first layers always see every token) and never reaches "keep everything". There the schedule
moves linearly from the largest published one to keeping every token, by the amount that makes the visual
tokens per decoder layer, averaged over the layers (`equivalent_tokens`), equal the budget on the model's own
depth; the full count (`budget=1.0` or 576) keeps every token, so the press prunes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

REFERENCE_TOKENS = 576


def equivalent_share(layers: Sequence[int], keeps: Sequence[float], num_layers: int) -> float:
    """Visual tokens per decoder layer as a share of the image's, averaged over `num_layers` layers, for stages
    cutting before `layers` to the (non-increasing) shares `keeps`."""
    present, total, previous = 1.0, 0.0, 0
    for layer, keep in zip(layers, keeps):
        total += present * (layer - previous)
        previous, present = layer, min(present, keep)
    return (total + present * (num_layers - previous)) / num_layers


def keeps_for_budget(
    tables: dict, budget, budget_share: float, layers: Sequence[int], num_layers: int, schedule
) -> list[float]:
    """Keep shares per stage for `budget` (a count of 576 or a fraction; `budget_share` of the visual tokens):
    `schedule(tables, budget)` up to the largest published budget; above it, the largest published schedule
    blended towards keeping everything so that `equivalent_share` equals the budget (never below the published
    schedule itself)."""
    top = max(tables)
    if budget_share * REFERENCE_TOKENS <= top + 1e-9:
        return schedule(tables, budget)
    base = schedule(tables, top)
    reached = equivalent_share(layers, base, num_layers)
    if reached >= 1.0:
        return [1.0] * len(base)
    weight = min(1.0, max(0.0, (budget_share - reached) / (1.0 - reached)))
    return [1.0 if weight == 1.0 else keep + weight * (1.0 - keep) for keep in base]


def split_for_budget(splits: dict, budget_share: float, interpolate) -> tuple[float, float] | None:
    """VisionZip's (dominant incl. [CLS], contextual) tokens of 576 for a budget: `interpolate(splits, budget)`
    up to the largest published budget; above it, the contextual tokens shrink linearly to none at the full
    count and the dominant ones fill the rest, so the total stays the budget. None at the full count: keep every
    patch, nothing added (the press prunes nothing)."""
    if budget_share >= 1.0:
        return None
    top = max(splits)
    budget = budget_share * REFERENCE_TOKENS
    if budget <= top:
        return tuple(interpolate(splits, budget_share))
    contextual = splits[top][1] * (REFERENCE_TOKENS - budget) / (REFERENCE_TOKENS - top)
    return budget - contextual, contextual


__all__ = ["equivalent_share", "keeps_for_budget", "split_for_budget"]
