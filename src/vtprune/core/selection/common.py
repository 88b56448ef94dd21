"""Shared pieces of the batched selections: the ranking rule and masks to index lists."""

from __future__ import annotations

import torch


def rank_order(
    scores: torch.Tensor,
    valid: torch.Tensor | None,
    padding: torch.Tensor | None = None,
    padding_fraction: torch.Tensor | None = None,
) -> torch.Tensor:
    """`stages.rank_order` for each row of a padded batch: (B, R) indices from best to worst (stable: ties in
    prompt order), padding tokens after every real one (from the least padded to the most in a row whose valid
    tokens are all padding, when padding_fraction (B, R) is given), the invalid slots last. scores (B, R),
    valid (B, R) bool (None: every slot, without padding: one argsort), padding (B, R) bool or None."""
    if valid is None and padding is None:
        return torch.argsort(scores, dim=1, descending=True, stable=True)
    if valid is None:
        valid = torch.ones_like(padding)
    real = valid if padding is None else valid & ~padding
    order = torch.argsort(torch.where(real, scores, float("-inf")), dim=1, descending=True, stable=True)
    group = torch.where(valid, 0.0, 2.0)  # real tokens, then padding, then invalid slots
    if padding is not None:
        fraction: float | torch.Tensor = 0.0
        if padding_fraction is not None:  # 0 unless every valid token of the row is padding: no reordering
            all_padding = (padding | ~valid).all(dim=1, keepdim=True)
            fraction = torch.where(all_padding, padding_fraction.float() / 2, 0.0)
        group = torch.where(real | ~valid, group, 1.0 + fraction)
    return torch.gather(order, 1, torch.argsort(torch.gather(group, 1, order), dim=1, stable=True))


def mask_to_indices(mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k True positions of each row of mask (B, R), ascending: indices (B, k) long (R where a row has
    fewer) and kept (B, k) bool."""
    width = mask.shape[1]
    positions = torch.where(mask, torch.arange(width, device=mask.device), width)
    indices = torch.sort(positions, dim=1).values[:, :k]
    return indices, indices < width


def pack_rows(
    fields: list[tuple[torch.Tensor, object]], counts: list[int], row: list[int], rows: int
) -> tuple[list[torch.Tensor], list[int]]:
    """Concatenate, per output row, the entries of the problems that belong to it. fields: (values (P, k, ...),
    fill) pairs of one layout; problem p uses its first counts[p] entries and goes to output row row[p] (host
    facts; a row's problems in turn). Returns the packed fields (rows, width, ...), `fill` past a row's entries,
    and each row's total (width = the largest). One problem per row, in order, each using all k entries: the
    fields as they are, no op; else 2 ops a field and 2 for the layout."""
    totals, starts = [0] * rows, []
    for p, count in zip(row, counts):
        starts.append(totals[p])
        totals[p] += count
    width, k = max(totals), fields[0][0].shape[1]
    if row == list(range(rows)) and all(count == k for count in counts):
        return [values for values, _ in fields], totals
    device = fields[0][0].device
    column = torch.tensor(
        [[start + j if j < count else width for j in range(k)] for start, count in zip(starts, counts)], device=device
    )  # (P, k): a spare column for the unused entries
    target = torch.tensor([[p] * k for p in row], device=device)
    packed = []
    for values, fill in fields:
        out = torch.full((rows, width + 1, *values.shape[2:]), fill, dtype=values.dtype, device=device)  # type: ignore[call-overload]  # fill: a number
        packed.append(out.index_put_((target, column), values)[:, :width])
    return packed, totals
