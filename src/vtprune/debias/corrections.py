"""Positional corrections beyond the paper's exponential (issue 23), and their calibration.

Two families:

* trends a score is divided by, stored as a `Profile` (its `kind` says which; `alpha` tempers it, f ** alpha):
  - "exp" with alpha < 1: the tempered exponential (mu * exp(sigma x)) ** alpha;
  - "curve": a smoothed per-position curve (the mean score per position, smoothed over one grid row);
  - "rowcol": a 2-D profile, a row trend times a column trend (outer product over the patch grid).
* per-request normalisations, `Debias(profile=...)` names without calibration:
  - "rowrank": each token's score replaced by its quantile among the real tokens of its image row (ties broken
    by the score): every row is ranked on its own scale, whatever the row's mean attention;
  - "rowmean": each score divided by the mean score of the real tokens of its image row, in this request.

Calibration (`fit_*`) reads first-stage `ScoreRecord`s of a validation split; `fit_alpha` picks the tempering
exponent that makes the keep frequency of the top-k flattest across image rows (the kept share per row closest
to equal, at the given budgets): dividing by the full mean trend over-corrects where the spread of the scores
differs by position (testbed-lm: the top row kept in most images).
"""

from __future__ import annotations

import numpy as np
import torch

from .profiles import Profile

#: per-request corrections (names `Debias(profile=...)` accepts besides "auto" and "default")
PER_REQUEST = ("rowrank", "rowmean")
#: the alphas `fit_alpha` tries
ALPHA_GRID = tuple(round(a, 2) for a in np.arange(0.0, 1.51, 0.05))
_TIE = 1e-3  # weight of the (normalised) score that breaks ties between equal row quantiles


# --- per-request corrections (batched, a few tensor ops each) -------------------------------------------------


def _row_groups(ranks, present, axis_start, axis_length, axis_columns):
    """(B, R) long group id (axis, row) of each token and (B, R) bool: whether it lies on an axis. A token of
    axis a sits at offset o = rank - start; its row is o // columns. Groups of different samples never meet (each
    sample is its own batch row)."""
    offset = ranks[:, None, :] - axis_start[:, :, None]  # (B, A, R)
    inside = (offset >= 0) & (offset < axis_length[:, :, None]) & present[:, None, :]
    row = torch.where(inside, offset // axis_columns.clamp(min=1)[:, :, None], 0).sum(1)  # axes are disjoint
    axis = inside.long().argmax(1)  # (B, R)
    width = ranks.shape[1] + 1  # more rows than any axis has
    return axis * width + row, inside.any(1)


def row_mean(scores, present, ranks, axis_start, axis_length, axis_columns, padding=None) -> torch.Tensor:
    """(B, R) scores divided by the mean score of the real tokens of their image row (the row's own level in this
    request); tokens on no axis, and rows without a real token, are left unchanged. Returns float32."""
    group, on_axis = _row_groups(ranks, present, axis_start, axis_length, axis_columns)
    real = on_axis if padding is None else on_axis & ~padding
    values = torch.where(real, scores, 0.0).float()
    # group ids are < A * (R + 1): a (B, A * (R + 1)) table holds every row's sums (no host synchronisation)
    size = axis_start.shape[1] * (ranks.shape[1] + 1)
    total = torch.zeros(scores.shape[0], size, device=scores.device).scatter_add_(1, group, values)
    count = torch.zeros_like(total).scatter_add_(1, group, real.float())
    mean = torch.gather(total / count.clamp(min=1), 1, group)
    usable = on_axis & (torch.gather(count, 1, group) > 0) & (mean > 0)
    return torch.where(usable, scores.float() / torch.where(usable, mean, 1.0), scores.float())


def row_rank(scores, present, ranks, axis_start, axis_length, axis_columns, padding=None) -> torch.Tensor:
    """(B, R) each token's quantile among the real tokens of its image row: 1 for the row's best, 1 - 1/n for the
    next, ... (n real tokens in the row), plus 1e-3 times the sample's min-max normalised score to break ties
    between rows. Padding and tokens on no axis get only the tie term (they rank after every real token).
    Returns float32. Two stable sorts, searchsorted, cumsum, a scatter: no loop over samples, rows or tokens."""
    batch, width = scores.shape
    group, on_axis = _row_groups(ranks, present, axis_start, axis_length, axis_columns)
    real = on_axis if padding is None else on_axis & ~padding
    raw = scores.float()
    low = torch.where(present, raw, float("inf")).amin(1, keepdim=True)
    high = torch.where(present, raw, float("-inf")).amax(1, keepdim=True)
    tie = torch.where(present, (raw - low) / (high - low).clamp(min=1e-30), 0.0)
    by_score = torch.sort(torch.where(real, raw, float("-inf")), dim=1, descending=True, stable=True).indices
    by_group = torch.sort(torch.gather(group, 1, by_score), dim=1, stable=True).indices
    order = torch.gather(by_score, 1, by_group)  # group by group, best score first (non-real last in a group)
    sorted_group = torch.gather(group, 1, order).contiguous()
    start = torch.searchsorted(sorted_group, sorted_group, side="left")
    end = torch.searchsorted(sorted_group, sorted_group, side="right")
    cumulative = torch.cat(
        [torch.zeros(batch, 1, device=scores.device), torch.gather(real.float(), 1, order).cumsum(1)], dim=1
    )
    real_in_group = torch.gather(cumulative, 1, end) - torch.gather(cumulative, 1, start)
    position = torch.arange(width, device=scores.device).expand(batch, width)
    quantile = 1.0 - (position - start).float() / real_in_group.clamp(min=1)
    quantile = torch.where(torch.gather(real, 1, order), quantile, 0.0)
    return torch.zeros_like(raw).scatter_(1, order, quantile) + _TIE * tie


# --- calibration on validation records ------------------------------------------------------------------------


def _image_scores(records, which: str = "raw"):
    """(N, L) scores of every image (each normalised by its mean over real tokens), (N, L) bool real tokens, and
    the grid (rows, cols); images of one fixed grid."""
    values, reals, grid = [], [], None
    for record in records:
        scores = getattr(record, which)
        for segment in record.segments:
            part = slice(segment.offset, segment.offset + segment.length)
            if grid is not None and tuple(segment.grid) != grid:
                raise ValueError(
                    f"images have different patch grids ({grid} and {tuple(segment.grid)}): positional "
                    "profiles need one fixed grid"
                )
            grid = tuple(segment.grid)
            real = np.ones(segment.length, dtype=bool) if record.padding is None else ~record.padding[part]
            real &= np.isfinite(scores[part])
            scale = scores[part][real].mean() if real.any() else 0.0
            if scale > 0:
                values.append(np.where(real, scores[part] / scale, 0.0))
                reals.append(real)
    if not values:
        raise ValueError("no scored images with a positive real score: the records are empty")
    return np.stack(values), np.stack(reals), grid


def _positive(values: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Means with no data (count 0) filled from the nearest position that has some; floored at 1e-6 of the max."""
    filled = values.copy()
    known = np.flatnonzero(count > 0)
    if len(known) == 0:
        return np.ones_like(values)
    missing = np.flatnonzero(count == 0)
    if len(missing):
        nearest = known[np.abs(missing[:, None] - known[None, :]).argmin(1)]
        filled[missing] = values[nearest]
    return np.maximum(filled, 1e-6 * filled.max())


def rowcol_trend(records) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Row trend (rows,) and column trend (cols,) of the mean normalised score over real tokens: the row trend
    is each row's mean; the column trend each column's mean after dividing by the row trend. Both scaled to mean 1."""
    values, real, (rows, cols) = _image_scores(records)
    v, r = values.reshape(-1, rows, cols), real.reshape(-1, rows, cols)
    count_row = r.sum((0, 2))
    row = _positive(v.sum((0, 2)) / np.maximum(count_row, 1), count_row)
    count_col = r.sum((0, 1))
    col = _positive((v / row[None, :, None]).sum((0, 1)) / np.maximum(count_col, 1), count_col)
    return row / row.mean(), col / col.mean(), (rows, cols)


def top_k_real(scores: np.ndarray, real: np.ndarray, keep: float) -> np.ndarray:
    """(N, L) bool: the top round(keep * L) real tokens of each image's `scores` (padding never kept, as with
    padding debiasing; fewer when an image has fewer real tokens)."""
    order = np.argsort(-np.where(real, scores, -np.inf), axis=1, kind="stable")
    place = np.empty_like(order)
    np.put_along_axis(place, order, np.broadcast_to(np.arange(scores.shape[1]), scores.shape).copy(), axis=1)
    k = np.minimum(round(keep * scores.shape[1]), real.sum(1))
    return (place < k[:, None]) & real


def row_flatness(kept: np.ndarray, real: np.ndarray, grid: tuple[int, int]) -> float:
    """How unequally the image rows are kept: the squared difference between each row's kept share (of its real
    tokens) and the overall kept share, averaged with the rows' real tokens as weights, relative to the overall
    share squared. kept, real (N, rows * cols) bool. 0: every row kept equally often."""
    rows, cols = grid
    per_row = kept.reshape(-1, rows, cols).sum((0, 2))
    real_row = real.reshape(-1, rows, cols).sum((0, 2))
    share = per_row / np.maximum(real_row, 1)
    overall = per_row.sum() / max(real_row.sum(), 1)
    return float((real_row * (share - overall) ** 2).sum() / max(real_row.sum(), 1)) / max(overall, 1e-12) ** 2


def keep_flatness(records, trend: np.ndarray | None, keeps=(0.25, 0.125)) -> float:
    """`row_flatness` of the top-k of raw / trend (`top_k_real`) on `records`' images, averaged over `keeps`."""
    values, real, grid = _image_scores(records)
    scores = values / (1.0 if trend is None else trend[None, :])
    return sum(row_flatness(top_k_real(scores, real, keep), real, grid) for keep in keeps) / len(keeps)


def fit_alpha(records, trend: np.ndarray, keeps=(0.25, 0.125), grid=ALPHA_GRID) -> tuple[float, dict]:
    """The tempering exponent alpha in `grid` whose trend ** alpha leaves the flattest keep frequency
    (`keep_flatness`) on `records`; also every alpha's flatness."""
    measured = {float(alpha): keep_flatness(records, trend**alpha, keeps) for alpha in grid}
    return min(measured, key=measured.get), measured


def corrected_profile(
    base: Profile,
    *,
    name: str,
    kind: str = "exp",
    alpha: float = 1.0,
    curve=None,
    description: str = "",
    extra: dict | None = None,
) -> Profile:
    """A copy of `base` (its method, layer, query, model) as another kind of correction."""
    info = dict(base.extra)
    info.update({"correction": kind if alpha == 1 else f"{kind} tempered", "written_by": "bench/corrections.py"})
    info.update(extra or {})
    return Profile(
        name=name,
        kind=kind,  # type: ignore[arg-type]  # checked by Profile
        length=base.length,
        sigma=base.sigma,
        mu=base.mu if kind == "exp" else 1.0,
        curve=None if curve is None else tuple(float(v) for v in curve),
        alpha=float(alpha),
        method=base.method,
        layer=base.layer,
        query=base.query,
        model=base.model,
        source="calibrated with vtprune",
        description=description,
        extra=info,
    )


__all__ = [
    "PER_REQUEST",
    "row_mean",
    "row_rank",
    "rowcol_trend",
    "top_k_real",
    "row_flatness",
    "keep_flatness",
    "fit_alpha",
    "corrected_profile",
]
