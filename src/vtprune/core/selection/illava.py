"""iLLaVA's language-model stage: the lowest tokens merged (rank-weighted) into the best of them, batched."""

from __future__ import annotations

import torch

from .common import rank_order


def illava_merge(
    scores: torch.Tensor,
    valid: torch.Tensor | None,
    values: torch.Tensor,
    keep: torch.Tensor | int,
    max_keep: int,
    padding: torch.Tensor | None = None,
    padding_fraction: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`ILLaVA.select` for a padded batch: the best `keep` tokens stay (ranking: `rank_order`, padding last); the
    last of them (the destination) becomes the weighted mean of itself (weight 1) and the r lower tokens (weights
    2, ..., r + 1, the lowest weighing most; padding tokens weigh 0: dropped, not merged).

    scores (B, R), valid (B, R) bool (None: every slot), values (B, R, D) the hidden states entering the layer; keep:
    int or (B,) long
    (>= 1), max_keep: static, at least every row's keep; padding, padding_fraction (B, R) or None. Returns indices
    (B, max_keep) ascending (R in unused slots), kept (B, max_keep) bool, and new values (B, max_keep, D) in
    values' dtype. About 45 ops, whatever B; 15 with an int keep, no mask and no padding (host facts).
    """
    batch, width, dim = values.shape
    device = values.device
    order = rank_order(scores, valid, padding, padding_fraction)  # (B, R) best first
    if isinstance(keep, int) and keep == max_keep and valid is None and padding is None:  # every row alike
        weight = torch.arange(2 - keep, width - keep + 2, dtype=torch.float32, device=device).clamp(min=0)  # as below
        weight = torch.zeros(batch, width, device=device).scatter(1, order, weight.expand(batch, width))
        destination = torch.bmm(weight[:, None, :], values.float())[:, 0] / weight.sum(dim=1, keepdim=True)  # (B, D)
        indices = torch.sort(order[:, :keep], dim=1).values
        new_values = torch.gather(values, 1, indices[:, :, None].expand(-1, -1, dim))
        is_target = (indices == order[:, keep - 1 : keep])[:, :, None]
        new_values = torch.where(is_target, destination[:, None, :].to(values.dtype), new_values)
        return indices, indices < width, new_values
    keep = torch.as_tensor(keep, device=device).reshape(-1, 1)
    valid = torch.ones(batch, width, dtype=torch.bool, device=device) if valid is None else valid
    slot = torch.arange(width, device=device)
    weight = (slot - keep + 2).float()  # 1 for the destination (slot keep - 1), then 2, 3, ...
    in_group = (slot >= keep - 1) & (slot < valid.sum(dim=1, keepdim=True))
    if padding is not None:
        in_group = in_group & ((slot == keep - 1) | ~torch.gather(padding, 1, order))
    weight = torch.zeros(batch, width, device=device).scatter(1, order, torch.where(in_group, weight, 0.0))
    destination = torch.bmm(weight[:, None, :], values.float())[:, 0] / weight.sum(dim=1, keepdim=True)  # (B, D)
    target = torch.gather(order, 1, (keep - 1).expand(batch, 1))  # (B, 1) the destination's index
    indices = torch.sort(torch.where(slot < keep, order, width), dim=1).values[:, :max_keep]
    new_values = torch.gather(values, 1, indices.clamp(max=width - 1)[:, :, None].expand(-1, -1, dim))
    new_values = torch.where((indices == target)[:, :, None], destination[:, None, :].to(values.dtype), new_values)
    return indices, indices < width, new_values
