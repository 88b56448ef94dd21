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
    features: torch.Tensor,
    valid: torch.Tensor | None,
    m: int,
    clusters: torch.Tensor | int,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """`methods.sparsevlm.density_peak_clusters` for P problems at once (the same centres and clusters).

    features (P, n, C) float, valid (P, n) bool (None: every token), m: static number of cluster slots (<= n),
    clusters (P,) long or an int for every problem: each problem's number of clusters (<= m and <= its valid
    tokens); rows: (P, 1) arange(P), when the caller has it. Returns centres (P, m) long (token indices, best
    first; slots beyond a problem's clusters hold other tokens), centre_ok (P, m) bool (the real slots; None when
    every problem has m clusters), and assignment (P, n) long: each valid token's cluster in 0..clusters-1
    (garbage for padding).

    Distances are `torch.cdist` of the padded problems, so its algorithm (direct below 26 rows, matrix product
    above) follows the padded width n: per-sample equal whenever each problem would pick the same algorithm.
    """
    problems, n, width = features.shape
    distance = torch.cdist(features, features) / math.sqrt(width)  # (P, n, n)
    all_clusters = isinstance(clusters, int) and clusters == m  # every slot real: no mask
    per_problem: Any = clusters if isinstance(clusters, int) else clusters[:, None]
    invalid = None if valid is None else ~valid
    if invalid is not None:
        distance_valid = distance.masked_fill(invalid[:, None, :], float("inf"))
    nearest = torch.topk(distance if invalid is None else distance_valid, m, dim=2, largest=False).values
    squared = nearest * nearest
    if not all_clusters:
        limit = per_problem if isinstance(per_problem, int) else per_problem[..., None]
        squared = squared.masked_fill(torch.arange(m, device=features.device) >= limit, 0.0)
    density = torch.exp(squared.sum(dim=2) / -per_problem)  # (P, n) the first `clusters` neighbours only
    if invalid is None:
        longest = distance.amax(dim=(1, 2), keepdim=True)  # (P, 1, 1)
    else:
        density = density.masked_fill(invalid, float("-inf"))
        longest = distance.masked_fill(invalid[:, :, None] | invalid[:, None, :], float("-inf"))
        longest = longest.amax(dim=(1, 2), keepdim=True)
    # delta: the distance to the nearest denser token, the largest distance for the densest (no distance between
    # valid tokens exceeds it, so it may stand in for every token that is not denser)
    not_denser = density[:, None, :] <= density[:, :, None]  # [p, i, j]: j is not denser than i
    delta = torch.where(not_denser, longest, distance).amin(dim=2)
    score = delta * density if invalid is None else (delta * density).masked_fill(invalid, float("-inf"))
    centres = torch.argsort(score, dim=1, descending=True, stable=True)[:, :m]  # (P, m)
    centre_ok = None if all_clusters else (torch.arange(m, device=features.device) < per_problem).expand(problems, m)
    if rows is None:
        rows = torch.arange(problems, device=features.device)[:, None]
    to_centre = distance[rows, :, centres]  # (P, m, n): [p, c, i] the distance of token i to centre c
    to_centre = to_centre.scatter_(2, centres[:, :, None], -1.0)  # a centre belongs to its own cluster
    if centre_ok is not None:
        to_centre = to_centre.masked_fill(~centre_ok[:, :, None], float("inf"))
    return centres, centre_ok, torch.argmin(to_centre, dim=1)


def _host_or_device(values: list[int], device) -> torch.Tensor | int:
    """An int when every entry is the same, else a (len,) long tensor."""
    return values[0] if values == [values[0]] * len(values) else torch.tensor(values, device=device)


def recycle_counts(pruned_counts: list[int], device) -> tuple[torch.Tensor | int, torch.Tensor | int]:
    """(candidates, clusters) per sample from each sample's pruned count (host ints): an int where every sample
    has the same, else a (B,) long tensor."""
    sizes = [recycle_sizes(count) for count in pruned_counts]
    return _host_or_device([size[0] for size in sizes], device), _host_or_device([size[1] for size in sizes], device)


def merge_candidates(
    values: torch.Tensor,
    candidates: torch.Tensor | int,
    clusters: torch.Tensor | int,
    n: int,
    m: int,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Cluster each sample's candidates by density peaks and merge each cluster into its members' mean.

    values (B, n, D) float: the candidates, best first (the first `candidates` of each row are real); candidates,
    clusters: per sample (an int for all, or (B,) long), at most n and m; rows: (B, 1) arange(B) if the caller has
    it. Returns centres (B, m) long indices into n (slots past a sample's clusters hold other candidates),
    merged (B, m, D) float (the cluster means; zeros past a sample's clusters) and kept (B, m) bool (the real
    clusters; None when every sample has m)."""
    batch = values.shape[0]
    candidate_ok = None
    if not (isinstance(candidates, int) and candidates == n):
        limit = candidates if isinstance(candidates, int) else candidates[:, None]
        candidate_ok = (torch.arange(n, device=values.device) < limit).expand(batch, n)
    centres, kept, assignment = density_peak_clusters(values, candidate_ok, m, clusters, rows)
    # (B, m, n) one-hot membership: each candidate marks its cluster (a padded one marks nothing)
    mark: Any = 1.0 if candidate_ok is None else candidate_ok[:, None, :].to(values.dtype)
    members = torch.zeros(batch, m, n, dtype=values.dtype, device=values.device)
    members = members.scatter_(1, assignment[:, None, :], mark)
    sizes = members.sum(dim=2, keepdim=True)  # (B, m, 1): a real cluster has its centre at least
    merged = torch.bmm(members, values) / (sizes if kept is None else sizes.clamp(min=1))
    return centres, merged, kept


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
    when every sample has m, known from pruned_counts). A sample with nothing pruned gets no cluster. About 45
    ops, whatever B (65 without pruned_counts). `methods.sparsevlm.SparseVLM.select` runs the same steps from its
    own ranking (`recycle_counts`, `merge_candidates`).
    """
    batch, width, dim = features.shape
    candidates: Any  # (B,) or, from host counts, an int where every row has the same
    clusters: Any
    if pruned_counts is None:
        num_pruned = pruned.sum(dim=1)
        candidates = torch.minimum(num_pruned, (num_pruned.double() * RECYCLE_SHARE).floor().long() + 1)
        clusters = torch.where(candidates > 0, candidates // 10 + 1, 0)
    else:
        candidates, clusters = recycle_counts(pruned_counts, raw.device)
    order = torch.argsort(raw.masked_fill(~pruned, float("-inf")), dim=1, descending=True, stable=True)
    order = order[:, :n]  # (B, n) candidates, best first
    values = torch.gather(features, 1, order[:, :, None].expand(batch, n, dim)).float()  # (B, n, D)
    centres, merged, kept = merge_candidates(values, candidates, clusters, n, m)
    centres = torch.gather(order, 1, centres)
    return centres if kept is None else torch.where(kept, centres, width), merged.to(features.dtype), kept
