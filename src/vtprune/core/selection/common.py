"""Shared pieces of the batched selections: the ranking rule and masks to index lists."""

from __future__ import annotations

import torch


def rank_order(scores: torch.Tensor, valid: torch.Tensor, padding: torch.Tensor | None = None,
               padding_fraction: torch.Tensor | None = None) -> torch.Tensor:
    """`stages.rank_order` for each row of a padded batch: (B, R) indices from best to worst (stable: ties in
    prompt order), padding tokens after every real one (from the least padded to the most in a row whose valid
    tokens are all padding, when padding_fraction (B, R) is given), the invalid slots last. scores (B, R),
    valid (B, R) bool, padding (B, R) bool or None."""
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


def pack_rows(values: torch.Tensor, ok: torch.Tensor, row: torch.Tensor, start: torch.Tensor, rows: int, width: int,
              fill=0) -> torch.Tensor:
    """Concatenate, per output row, the entries of the problems that belong to it: values (P, k, ...), ok (P, k)
    bool (a prefix of each problem's k), row (P,) the output row of each problem, start (P,) the column where its
    entries begin (host-known counts make these static). Returns (rows, width, ...) with `fill` elsewhere."""
    column = torch.where(ok, start[:, None] + torch.arange(ok.shape[1], device=ok.device), width)  # spare column
    out = torch.full((rows, width + 1, *values.shape[2:]), fill, dtype=values.dtype, device=values.device)
    out = out.index_put_((row[:, None].expand_as(column), column), values)
    return out[:, :width]
