"""SparseVLM's recycling of pruned tokens (density-peak clustering into cluster means), batched over samples."""

from __future__ import annotations

import math

import torch

RECYCLE_SHARE = 0.3  # as methods.sparsevlm


def recycle_sizes(num_pruned: int) -> tuple[int, int]:
    """(candidates, clusters) that SparseVLM recycles from `num_pruned` pruned tokens: int(0.3 n) + 1 (at most n)
    and candidates // 10 + 1; (0, 0) when nothing is pruned. Both grow with num_pruned, so the sizes of the batch's
    largest num_pruned bound every sample's (the static `n` and `m` of `recycle`)."""
    candidates = min(num_pruned, int(num_pruned * RECYCLE_SHARE) + 1)
    return candidates, (candidates // 10 + 1 if candidates else 0)


def density_peak_clusters(features: torch.Tensor, valid: torch.Tensor, m: int,
                          clusters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`methods.sparsevlm.density_peak_clusters` for P problems at once (the same centres and clusters).

    features (P, n, C) float, valid (P, n) bool, m: static number of cluster slots (<= n), clusters (P,) long: each
    problem's number of clusters (<= m and <= its valid tokens). Returns centres (P, m) long (token indices, best
    first; slots beyond a problem's clusters hold other tokens), centre_ok (P, m) bool (the real slots), and
    assignment (P, n) long: each valid token's cluster in 0..clusters-1 (garbage for padding).

    Distances are `torch.cdist` of the padded problems, so its algorithm (direct below 26 rows, matrix product
    above) follows the padded width n: per-sample equal whenever each problem would pick the same algorithm.
    """
    problems, n, width = features.shape
    distance = torch.cdist(features, features) / math.sqrt(width)  # (P, n, n)
    slot = torch.arange(m, device=features.device)
    nearest = torch.topk(torch.where(valid[:, None, :], distance, float("inf")), m, dim=2, largest=False).values
    squared = torch.where(slot < clusters[:, None, None], nearest * nearest, 0.0).sum(dim=2)  # first `clusters` only
    density = torch.where(valid, torch.exp(-(squared / clusters[:, None])), float("-inf"))  # (P, n)
    denser = density[:, None, :] > density[:, :, None]  # [p, i, j]: j is denser than i
    delta = torch.where(denser, distance, float("inf")).amin(dim=2)
    longest = torch.where(valid[:, :, None] & valid[:, None, :], distance, float("-inf")).amax(dim=(1, 2))
    delta = torch.where(torch.isinf(delta), longest[:, None], delta)  # the densest: the largest distance
    score = torch.where(valid, delta * density, float("-inf"))
    centres = torch.argsort(score, dim=1, descending=True, stable=True)[:, :m]  # (P, m)
    centre_ok = slot < clusters[:, None]
    to_centre = torch.gather(distance, 2, centres[:, None, :].expand(problems, n, m))  # (P, n, m)
    is_centre = torch.arange(n, device=features.device)[None, :, None] == centres[:, None, :]
    to_centre = torch.where(is_centre, -1.0, to_centre)  # a centre belongs to its own cluster
    assignment = torch.argmin(torch.where(centre_ok[:, None, :], to_centre, float("inf")), dim=2)
    return centres, centre_ok, assignment


def recycle(raw: torch.Tensor, pruned: torch.Tensor, features: torch.Tensor, n: int,
            m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SparseVLM's recycling for a padded batch: the best int(0.3 p) + 1 of each sample's p pruned tokens by raw
    score (ties: the earlier token) are clustered by density peaks into candidates // 10 + 1 clusters, and each
    cluster becomes its members' mean.

    raw (B, V) raw scores; pruned (B, V) bool (valid tokens not kept); features (B, V, D) the hidden states;
    n, m: static candidate and cluster slots, at least every sample's (`recycle_sizes` of the largest p; m >= 1).
    Returns centres (B, m) long: the centre of each cluster as an index in V (V in unused slots), merged (B, m, D)
    in features' dtype (the cluster means; zeros in unused slots), and kept (B, m) bool: the real clusters.
    A sample with nothing pruned gets no cluster. About 100 ops, whatever B.
    """
    batch, width, dim = features.shape
    num_pruned = pruned.sum(dim=1)
    candidates = torch.minimum(num_pruned, (num_pruned.double() * RECYCLE_SHARE).floor().long() + 1)
    clusters = torch.where(candidates > 0, candidates // 10 + 1, 0)
    order = torch.argsort(torch.where(pruned, raw.double(), float("-inf")), dim=1, descending=True, stable=True)
    order = order[:, :n]  # (B, n) candidates, best first
    candidate_ok = torch.arange(n, device=raw.device) < candidates[:, None]
    values = torch.gather(features, 1, order[:, :, None].expand(batch, n, dim)).float()  # (B, n, D)
    centres, kept, assignment = density_peak_clusters(values, candidate_ok, m, clusters)
    members = ((assignment[:, :, None] == torch.arange(m, device=raw.device)) & candidate_ok[:, :, None]).float()
    merged = torch.bmm(members.transpose(1, 2), values) / members.sum(dim=1).clamp(min=1)[:, :, None]
    return torch.where(kept, torch.gather(order, 1, centres), width), merged.to(features.dtype), kept
