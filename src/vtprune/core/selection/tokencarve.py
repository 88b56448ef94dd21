"""TokenCarve's information score, Borda fusion and merge, batched over samples."""

from __future__ import annotations

from typing import Any

import torch


def information(states: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """`TokenCarve.information` per sample: (B, R, D) hidden states, valid (B, R) bool (None: every slot) ->
    (B, R) L1 norm of each row of U S
    (states = U S V^T), from one batched eigendecomposition of the Gram matrices in float64 (padding rows are
    zeroed: they add zero eigenvalues only). Invalid slots get 0. On CUDA, eigh checks its solver's error codes on
    the host (very likely one synchronisation per call, as in `TokenCarve.information`; unverified here, and not
    visible to the CPU op counter)."""
    device = states.device
    values = states if valid is None else torch.where(valid[:, :, None], states, 0.0)
    if device.type == "mps":  # no float64 on MPS
        values = values.cpu()
    values = values.double()
    eigenvalues, vectors = torch.linalg.eigh(torch.bmm(values, values.transpose(1, 2)))
    return (vectors * eigenvalues.clamp_min(0).sqrt()[:, None, :]).abs().sum(dim=2).float().to(device)


def borda(attention: torch.Tensor, information: torch.Tensor, valid: torch.Tensor | None, av_weight: float = 0.5):
    """`TokenCarve._borda` per row: the r-th of a row's V valid tokens by attention gets av_weight (V - r) points,
    by information (1 - av_weight) (V - r); ties: the earlier token ranks first. (B, R) each, valid None: every
    slot -> (B, R) float32 (0 in invalid slots)."""
    batch, width = attention.shape
    if valid is None:
        points = torch.arange(width, 0, -1, dtype=torch.float32, device=attention.device).expand(batch, width)
    else:
        count = valid.sum(dim=1, keepdim=True)
        points = (count - torch.arange(width, device=attention.device)).clamp(min=0).float()  # (B, R)
    fused = torch.zeros(attention.shape, device=attention.device)
    for scores, weight in ((attention, av_weight), (information, 1 - av_weight)):
        scores = scores.float() if valid is None else torch.where(valid, scores.float(), float("-inf"))
        order = torch.argsort(scores, dim=1, descending=True, stable=True)
        fused = fused.scatter_add(1, order, points * weight)
    return fused


def carve_merge(
    fused: torch.Tensor, states: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor | int, max_keep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`TokenCarve.select`'s candidates and `_merge`, per row: the best c = min(V, max(keep, int(1.5 keep))) by
    fused score (ties: the earlier token); A = the first c // 2, B = the rest; the c - keep B tokens most similar
    (cosine) to an A token (ties: the earlier) are averaged into their most similar A token (the first on ties,
    plain mean with it), the other B tokens stay. Exactly `keep` tokens remain.

    fused (B, R), states (B, R, D) float, valid (B, R) bool (None: every slot), keep: int or (B,) long, max_keep:
    static, at least every row's keep. Returns indices (B, max_keep) ascending token indices (R in unused slots), kept
    (B, max_keep) bool, and values (B, max_keep, D) float32: the merged A tokens' means, the states otherwise.
    """
    batch, width, dim = states.shape
    device = states.device
    size = min(width, max(max_keep, max_keep * 3 // 2))  # static candidate slots
    slot = torch.arange(size, device=device)
    count: Any  # an int (host facts) or (B, 1) per row
    half: Any
    merges: Any
    if valid is None and isinstance(keep, int):  # host facts, every row alike: (C,) masks
        count = min(width, max(keep, keep * 3 // 2))  # int(keep / 2 * 3) for ints >= 0
        half, merges = count // 2, min(count - keep, count // 2)
        in_a, in_b = slot < half, (slot >= half) & (slot < count) if count < size else slot >= half
    else:
        keep = torch.as_tensor(keep, device=device).reshape(-1, 1).expand(batch, 1)
        present = width if valid is None else valid.sum(dim=1, keepdim=True)
        count = torch.clamp(torch.maximum(keep, keep * 3 // 2), max=present)
        half = count // 2
        merges = torch.minimum(count - keep, half)
        in_a, in_b = slot < half, (slot >= half) & (slot < count)  # (B, C)
    scores = fused if valid is None else torch.where(valid, fused, float("-inf"))
    candidates = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :size]
    values = torch.gather(states, 1, candidates[:, :, None].expand(-1, -1, dim)).float()  # (B, C, D)
    unit = torch.nn.functional.normalize(values, dim=-1)
    similarity = torch.where(in_a.unsqueeze(-2), torch.bmm(unit, unit.transpose(1, 2)), float("-inf"))
    best, target = similarity.max(dim=2)  # (B, C): best A for each candidate (the first on ties)
    order = torch.argsort(torch.where(in_b, best, float("-inf")), dim=1, descending=True, stable=True)
    merging = torch.zeros(batch, size, dtype=torch.bool, device=device)  # (B, C) the B tokens merged away
    if isinstance(merges, int):
        merging = merging.scatter(1, order[:, :merges], True)
    else:
        merging = merging.scatter(1, order, (slot < merges).expand(batch, size))
    # merged tokens are added to their A token, which is divided by its count; every other row stays as it is (/ 1)
    totals = values.scatter_add(1, target[:, :, None].expand(-1, -1, dim), values * merging[:, :, None])
    values = totals / torch.ones(batch, size, device=device).scatter_add(1, target, merging.float())[:, :, None]
    stays = ~merging if isinstance(count, int) and count == size else in_a | (in_b & ~merging)  # A and B: all
    position = torch.sort(torch.where(stays, candidates, width), dim=1)  # kept token indices, ascending
    indices = position.values[:, :max_keep]
    values = torch.gather(values, 1, position.indices[:, :max_keep, None].expand(-1, -1, dim))
    return indices, indices < width, values
