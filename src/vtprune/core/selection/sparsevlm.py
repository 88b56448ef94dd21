"""SparseVLM's recycling of pruned tokens (density-peak clustering into cluster means), batched over samples."""

from __future__ import annotations

import math
from typing import Any

import torch

RECYCLE_SHARE = 0.3  # as methods.sparsevlm


def recycle_sizes(num_pruned: int) -> tuple[int, int]:
    """(candidates, clusters) that SparseVLM recycles from `num_pruned` pruned tokens: int(0.3 n) + 1 (at most n)
    and candidates // 10 + 1; (0, 0) when nothing is pruned. Both grow with num_pruned, so the sizes of the batch's
    largest num_pruned bound every sample's (the static `n` and `m` of `recycle`)."""
    candidates = min(num_pruned, int(num_pruned * RECYCLE_SHARE) + 1)
    return candidates, (candidates // 10 + 1 if candidates else 0)


def density_peak_clusters(
    features: torch.Tensor, valid: torch.Tensor | None, m: int, clusters: torch.Tensor | int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """`methods.sparsevlm.density_peak_clusters` for P problems at once (the same centres and clusters).

    features (P, n, C) float, valid (P, n) bool (None: every token), m: static number of cluster slots (<= n),
    clusters (P,) long or an int for every problem: each problem's number of clusters (<= m and <= its valid
    tokens). Returns centres (P, m) long (token indices, best first; slots beyond a problem's clusters hold other
    tokens), centre_ok (P, m) bool (the real slots; None when every problem has m clusters), and assignment (P, n)
    long: each valid token's cluster in 0..clusters-1 (garbage for padding).

    Distances are `torch.cdist` of the padded problems, so its algorithm (direct below 26 rows, matrix product
    above) follows the padded width n: per-sample equal whenever each problem would pick the same algorithm.
    """
    problems, n, width = features.shape
    distance = torch.cdist(features, features) / math.sqrt(width)  # (P, n, n)
    all_clusters = isinstance(clusters, int) and clusters == m  # every slot real: no mask
    slot = torch.arange(m, device=features.device)
    per_problem: Any = clusters if isinstance(clusters, int) else clusters[:, None]
    if valid is not None:
        distance_valid = torch.where(valid[:, None, :], distance, float("inf"))
    nearest = torch.topk(distance if valid is None else distance_valid, m, dim=2, largest=False).values
    squared = nearest * nearest if all_clusters else torch.where(slot < per_problem[..., None], nearest * nearest, 0.0)
    density = torch.exp(-(squared.sum(dim=2) / per_problem))  # (P, n) the first `clusters` neighbours only
    if valid is not None:
        density = torch.where(valid, density, float("-inf"))
    denser = density[:, None, :] > density[:, :, None]  # [p, i, j]: j is denser than i
    delta = torch.where(denser, distance, float("inf")).amin(dim=2)
    if valid is None:
        longest = distance.amax(dim=(1, 2))
    else:
        longest = torch.where(valid[:, :, None] & valid[:, None, :], distance, float("-inf")).amax(dim=(1, 2))
    delta = torch.where(torch.isinf(delta), longest[:, None], delta)  # the densest: the largest distance
    score = delta * density if valid is None else torch.where(valid, delta * density, float("-inf"))
    centres = torch.argsort(score, dim=1, descending=True, stable=True)[:, :m]  # (P, m)
    centre_ok = None if all_clusters else (slot < per_problem).expand(problems, m)
    to_centre = torch.gather(distance, 2, centres[:, None, :].expand(problems, n, m))  # (P, n, m)
    to_centre = to_centre.scatter_(1, centres[:, None, :], -1.0)  # a centre belongs to its own cluster
    if centre_ok is not None:
        to_centre = torch.where(centre_ok[:, None, :], to_centre, float("inf"))
    return centres, centre_ok, torch.argmin(to_centre, dim=2)


def _host_or_device(values: list[int], device) -> torch.Tensor | int:
    """An int when every entry is the same, else a (len,) long tensor."""
    return values[0] if values == [values[0]] * len(values) else torch.tensor(values, device=device)


def recycle(
    raw: torch.Tensor,
    pruned: torch.Tensor,
    features: torch.Tensor,
    n: int,
    m: int,
    pruned_counts: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """SparseVLM's recycling for a padded batch: the best int(0.3 p) + 1 of each sample's p pruned tokens by raw
    score (ties: the earlier token) are clustered by density peaks into candidates // 10 + 1 clusters, and each
    cluster becomes its members' mean.

    raw (B, V) raw scores; pruned (B, V) bool (valid tokens not kept); features (B, V, D) the hidden states;
    n, m: static candidate and cluster slots, at least every sample's (`recycle_sizes` of the largest p; m >= 1);
    pruned_counts: each sample's p when the host knows it (else counted on the device).
    Returns centres (B, m) long: the centre of each cluster as an index in V (V in unused slots), merged (B, m, D)
    in features' dtype (the cluster means; zeros in unused slots), and kept (B, m) bool: the real clusters (None
    when every sample has m, known from pruned_counts). A sample with nothing pruned gets no cluster. About 60
    ops, whatever B (80 without pruned_counts).
    """
    batch, width, dim = features.shape
    candidates: Any  # (B,) or, from host counts, an int where every row has the same
    clusters: Any
    if pruned_counts is None:
        num_pruned = pruned.sum(dim=1)
        candidates = torch.minimum(num_pruned, (num_pruned.double() * RECYCLE_SHARE).floor().long() + 1)
        clusters = torch.where(candidates > 0, candidates // 10 + 1, 0)
    else:
        sizes = [recycle_sizes(count) for count in pruned_counts]
        candidates = _host_or_device([size[0] for size in sizes], raw.device)
        clusters = _host_or_device([size[1] for size in sizes], raw.device)
    order = torch.argsort(torch.where(pruned, raw.double(), float("-inf")), dim=1, descending=True, stable=True)
    order = order[:, :n]  # (B, n) candidates, best first
    candidate_ok = (
        None
        if isinstance(candidates, int) and candidates == n
        else torch.arange(n, device=raw.device) < (candidates if isinstance(candidates, int) else candidates[:, None])
    )
    if candidate_ok is not None:
        candidate_ok = candidate_ok.expand(batch, n)
    values = torch.gather(features, 1, order[:, :, None].expand(batch, n, dim)).float()  # (B, n, D)
    centres, kept, assignment = density_peak_clusters(values, candidate_ok, m, clusters)
    members = assignment[:, :, None] == torch.arange(m, device=raw.device)
    if candidate_ok is not None:
        members = members & candidate_ok[:, :, None]
    members = members.float()
    merged = torch.bmm(members.transpose(1, 2), values) / members.sum(dim=1).clamp(min=1)[:, :, None]
    centres = torch.gather(order, 1, centres)
    return centres if kept is None else torch.where(kept, centres, width), merged.to(features.dtype), kept
