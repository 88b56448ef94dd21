"""VisionZip's dominant tokens and contextual merging, batched over images."""

from __future__ import annotations

from typing import Any

import torch

from .common import rank_order


def visionzip_select(
    scores: torch.Tensor,
    valid: torch.Tensor | None,
    keys: torch.Tensor,
    features: torch.Tensor,
    patches: torch.Tensor | int,
    contextual: torch.Tensor | int,
    max_patches: int,
    max_contextual: int,
    padding: torch.Tensor | None = None,
    padding_fraction: torch.Tensor | None = None,
):
    """VisionZip per image (`methods.visionzip.VisionZip.select`'s loop body), P images at once.

    scores (P, L) the [CLS] scores of each image's patches (debiased as the method does), valid (P, L) bool (None:
    every patch); keys
    (P, L, d) the head-mean keys of the patches, features (P, L, D) their vision features (pre-projector);
    patches / contextual: dominant patches and contextual tokens per image (ints or (P,) long, at most
    max_patches / max_contextual, static); padding, padding_fraction (P, L) or None: as `rank_order`.
    Dominant: the best `patches` by score (padding last). Contextual: the other patches, in order, are assigned
    to targets every (count // contextual)-th of them by key cosine similarity (ties: the first target); each
    target becomes its feature plus the mean of its members' (targets are not members).

    Returns dominant (P, max_patches) ascending patch indices (L in unused slots), dominant_ok (P, max_patches),
    targets (P, max_contextual) ascending patch indices (L in unused slots), merged (P, max_contextual, D) in
    features' dtype, targets_ok (P, max_contextual). About 65 ops, whatever P; 50 without masks (host facts).
    """
    problems, length, width = features.shape
    device = features.device
    position = torch.arange(length, device=device)
    every_patch = isinstance(patches, int) and patches == max_patches  # host facts: no masks to build
    every_context = isinstance(contextual, int) and contextual == max_contextual
    patches = patches if isinstance(patches, int) else patches.reshape(-1, 1)
    contextual = contextual if isinstance(contextual, int) else contextual.reshape(-1, 1)
    order = rank_order(scores, valid, padding, padding_fraction)[:, :max_patches]
    is_dominant = torch.zeros(problems, length, dtype=torch.bool, device=device)
    if every_patch:
        is_dominant = is_dominant.scatter(1, order, True)
        dominant = torch.sort(order, dim=1).values
    else:
        dominant_ok = (torch.arange(max_patches, device=device) < patches).expand(problems, max_patches)
        is_dominant = is_dominant.scatter(1, order, dominant_ok)
        dominant = torch.sort(torch.where(dominant_ok, order, length), dim=1).values
    rest = ~is_dominant if valid is None else valid & ~is_dominant
    candidates = torch.sort(torch.where(rest, position, length), dim=1).values  # (P, L) the rest, in order
    divisor = max(contextual, 1) if isinstance(contextual, int) else contextual.clamp(min=1)
    count: Any = length - patches if valid is None and every_patch else rest.sum(dim=1, keepdim=True)  # the rest
    if isinstance(count, int) and isinstance(divisor, int):
        step = max(count // divisor, 1)
    else:
        step = (count // divisor).clamp(min=1)
    slot = torch.arange(max_contextual, device=device)
    pick = (slot * step).clamp(max=length - 1).expand(problems, max_contextual)
    targets = torch.gather(candidates, 1, pick)  # (P, Kc) ascending
    if not every_context:
        targets_ok = (slot < contextual).expand(problems, max_contextual)
        targets = torch.where(targets_ok, targets, length)
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)  # (P, L, d)
    target_unit = torch.gather(unit, 1, targets.clamp(max=length - 1)[:, :, None].expand(-1, -1, unit.shape[-1]))
    similarity = torch.bmm(unit, target_unit.transpose(1, 2))  # (P, L, Kc)
    if not every_context:
        similarity = torch.where(targets_ok[:, None, :], similarity, float("-inf"))
    assignment = torch.argmax(similarity, dim=2)  # (P, L)
    is_target = (position[:, None] == targets[:, None, :]).any(dim=2)  # (P, L)
    members = (assignment[:, :, None] == slot) & (rest & ~is_target)[:, :, None]  # (P, L, Kc)
    members = members.float()
    values = features.float()
    target_values = torch.gather(values, 1, targets.clamp(max=length - 1)[:, :, None].expand(-1, -1, width))
    merged = target_values + torch.bmm(members.transpose(1, 2), values) / members.sum(dim=1).clamp(min=1)[:, :, None]
    return dominant, dominant < length, targets, merged.to(features.dtype), targets < length
