"""DivPrune's greedy max-min (farthest point) selection, batched over problems (the images of every sample)."""

from __future__ import annotations

import torch


def max_min_select(
    features: torch.Tensor, valid: torch.Tensor | None, k: int, count: torch.Tensor | None = None, ordered: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """`methods.divprune.max_min_diverse` for P problems at once (same picks, same ties: the earlier token).

    features (P, n, D), one problem per row (an image; padded); valid (P, n) bool (None: every token); k: picks
    per problem (a static int); count (P,) long or None: the picks each problem keeps (<= k and <= its valid
    tokens; default k). Returns indices (P, k) long and kept (P, k) bool: the picks sorted ascending with the
    slots beyond a problem's count holding n (so they sort last, kept False); with ordered=True, indices in pick
    order instead (slots beyond count hold later greedy picks, kept False).

    The greedy steps stay a loop: each pick needs the distances to the previous one. It is batched over the
    problems and costs 3 ops per step (argmax, one row gather, minimum: a picked token's own distance is -1, so
    the minimum also retires it), 3 k + 9 ops in all (+ 13 with padding or a count), whatever P. No host
    synchronisation. This is the floor for exactly these picks: each step reduces over the gaps to find its pick,
    reads that pick's distance row (an index that depends on the reduction) and folds it into the gaps (which the
    next reduction reads); no aten op fuses two of these, so k picks cost at least 3 (k - 1) ops.
    """
    problems, n, _ = features.shape
    if not 1 <= k <= n:
        raise ValueError(f"max_min_select: k={k} must lie in 1..{n} (the tokens per problem)")
    unit = features.float()
    unit = unit / unit.norm(dim=-1, keepdim=True)
    distance = 1 - torch.bmm(unit, unit.transpose(1, 2))  # (P, n, n) 1 - cosine
    if valid is not None:
        distance = torch.where(valid[:, :, None], distance, float("inf"))  # a padded token is nobody's neighbour
    nearest = torch.kthvalue(distance, 2, dim=1).values  # (P, n) the distance to the nearest other token
    pick = torch.argmax(nearest if valid is None else torch.where(valid, nearest, float("-inf")), dim=1)  # (P,)
    if valid is not None:
        distance = torch.where(valid[:, None, :], distance, -2.0)  # padded tokens: below every gap, never picked
    distance.diagonal(dim1=1, dim2=2).fill_(-1.0)  # below any distance: a picked token is retired by the minimum
    rows = torch.arange(problems, device=features.device)
    gap = distance[rows, pick]  # (P, n) each token's distance to the chosen set
    picks = [pick]
    for step in range(1, k):
        if step > 1:  # the previous pick joins the chosen set
            gap = torch.minimum(gap, distance[rows, picks[-1]])
        picks.append(torch.argmax(gap, dim=1))
    indices = torch.stack(picks, dim=1)  # (P, k) pick order
    if count is None:
        kept = torch.ones(problems, k, dtype=torch.bool, device=features.device)
        return (indices if ordered else torch.sort(indices, dim=1).values), kept
    kept = torch.arange(k, device=features.device) < count[:, None]
    if ordered:
        return indices, kept
    indices = torch.sort(torch.where(kept, indices, n), dim=1).values
    return indices, indices < n
