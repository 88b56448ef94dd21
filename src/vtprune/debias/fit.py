"""Fitting the positional trend f(x) = mu * exp(sigma * x) to attention scores.

* `fit_exponential`: least squares on a mean score curve (calibration over a data set), reporting R^2 and
  residuals.
* `fit_robust`: a per-request fit used by `Debias(profile="auto")`: least squares in log space with Huber
  weights (iteratively reweighted), so that the few tokens that matter, whose scores sit far above the
  trend, do not bend it. `robust_sigma` is the same fit in torch, on the scores' device, with no
  host synchronisation (what debiasing runs per request).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ExpFit:
    """f(x) = mu * exp(sigma * x) on x in [0, 1]; r2 and residuals (y - f) refer to the fitted points."""

    mu: float
    sigma: float
    r2: float
    residuals: np.ndarray

    def __call__(self, x) -> np.ndarray:
        return self.mu * np.exp(self.sigma * np.asarray(x, dtype=np.float64))


def relative_positions(length: int) -> np.ndarray:
    """x = i / L for i = 0..L-1 (the convention of the published profiles)."""
    return np.arange(length, dtype=np.float64) / length


def _loglinear(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, float]:
    """Weighted least squares of log y = log mu + sigma x. Returns (log mu, sigma)."""
    w = np.ones_like(x) if weights is None else weights
    design = np.stack([np.ones_like(x), x], axis=1) * np.sqrt(w)[:, None]
    coef, *_ = np.linalg.lstsq(design, np.log(y) * np.sqrt(w), rcond=None)
    return float(coef[0]), float(coef[1])


def fit_exponential(y, x=None, iterations: int = 50) -> ExpFit:
    """Least-squares fit of mu*exp(sigma*x) to y (L,) (Gauss-Newton from the log-linear start).

    x defaults to i/L. Non-positive values are allowed in y (they are skipped for the starting point only).
    """
    y = np.asarray(y, dtype=np.float64)
    x = relative_positions(len(y)) if x is None else np.asarray(x, dtype=np.float64)
    if y.ndim != 1 or len(y) < 2 or len(x) != len(y):
        raise ValueError(f"need a 1-D curve of at least 2 points with matching x, got y {y.shape}, x {x.shape}")
    if not np.isfinite(y).all():
        raise ValueError("the score curve contains nan or inf values")
    positive = y > 0
    if positive.sum() < 2:
        raise ValueError("the score curve has fewer than 2 positive values: nothing to fit")
    log_mu, sigma = _loglinear(x[positive], y[positive])
    mu = float(np.exp(log_mu))

    def sse(m, s):
        with np.errstate(over="ignore", invalid="ignore"):
            value = float(((y - m * np.exp(s * x)) ** 2).sum())
        return value if np.isfinite(value) else float("inf")

    current = sse(mu, sigma)
    for _ in range(iterations):  # Gauss-Newton with backtracking: the error never grows (no divergence)
        f = mu * np.exp(sigma * x)
        jacobian = np.stack([f / mu, f * x], axis=1)
        step, *_ = np.linalg.lstsq(jacobian, y - f, rcond=None)
        for scale in 0.5 ** np.arange(12):
            new_mu, new_sigma = mu + scale * float(step[0]), sigma + scale * float(step[1])
            candidate = sse(new_mu, new_sigma) if new_mu > 0 else float("inf")
            if candidate < current:
                break
        else:
            break  # no step improves the fit: converged
        converged = np.abs(scale * step).max() < 1e-12 * max(1.0, abs(mu), abs(sigma))
        mu, sigma, current = new_mu, new_sigma, candidate
        if converged:
            break
    f = mu * np.exp(sigma * x)
    residuals = y - f
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residuals**2).sum()) / total if total > 0 else 1.0
    return ExpFit(mu=mu, sigma=sigma, r2=r2, residuals=residuals)


def fit_robust(y, x=None, delta: float = 1.0, iterations: int = 20) -> ExpFit:
    """Robust fit of mu*exp(sigma*x) in log space with Huber weights (IRLS).

    y (R,) scores (> 0 values are used), x (R,) relative positions. delta is the Huber threshold in units of
    the residuals' median absolute deviation. A few large spikes (relevant tokens) barely move the trend.
    """
    y = np.asarray(y, dtype=np.float64)
    x = relative_positions(len(y)) if x is None else np.asarray(x, dtype=np.float64)
    keep = np.isfinite(y) & (y > 0)
    if keep.sum() < 2:
        return ExpFit(mu=1.0, sigma=0.0, r2=0.0, residuals=np.zeros(0))
    xs, logy = x[keep], np.log(y[keep])
    weights = np.ones_like(xs)
    log_mu, sigma = _loglinear(xs, y[keep])
    for _ in range(iterations):
        residual = logy - (log_mu + sigma * xs)
        scale = 1.4826 * np.median(np.abs(residual - np.median(residual))) + 1e-12
        u = np.abs(residual) / (delta * scale)
        new_weights = np.where(u <= 1.0, 1.0, 1.0 / u)
        if np.allclose(new_weights, weights, atol=1e-6):
            break
        weights = new_weights
        log_mu, sigma = _loglinear(xs, y[keep], weights)
    residual = logy - (log_mu + sigma * xs)
    total = float(((logy - logy.mean()) ** 2).sum())
    r2 = 1.0 - float((residual**2).sum()) / total if total > 0 else 1.0
    return ExpFit(mu=float(np.exp(log_mu)), sigma=sigma, r2=r2, residuals=residual)


def robust_sigma(y: torch.Tensor, x: torch.Tensor, use: torch.Tensor, delta: float = 1.0, iterations: int = 20) -> torch.Tensor:
    """`fit_robust`'s sigma, in torch on y's device, without a host synchronisation; batched over leading dims.

    y (..., R) scores, x (..., R) relative positions, use (..., R) bool: which points to fit (non-positive or
    non-finite y are skipped too). Returns sigma (...,) float64; fewer than 2 usable points give 0. The IRLS runs
    a fixed number of iterations (once the weights have converged further iterations leave them unchanged)."""
    y, x = y.double(), x.double()
    use = use & torch.isfinite(y) & (y > 0)
    logy = torch.where(use, torch.log(torch.where(use, y, 1.0)), 0.0)
    count = use.sum(dim=-1, keepdim=True)

    def solve(w):
        s0, s1, s2 = w.sum(-1), (w * x).sum(-1), (w * x * x).sum(-1)
        t0, t1 = (w * logy).sum(-1), (w * x * logy).sum(-1)
        det = s0 * s2 - s1 * s1
        ok = det.abs() > 1e-300
        safe = torch.where(ok, det, 1.0)
        return torch.where(ok, (s2 * t0 - s1 * t1) / safe, 0.0), torch.where(ok, (s0 * t1 - s1 * t0) / safe, 0.0)

    def median(values):  # numpy's median over the used points (mean of the two middle ones)
        ordered = torch.sort(torch.where(use, values, float("inf")), dim=-1).values
        low = torch.gather(ordered, -1, ((count - 1) // 2).clamp(min=0))
        high = torch.gather(ordered, -1, (count // 2).clamp(min=0))
        return (low + high) / 2

    log_mu, sigma = solve(use.double())
    for _ in range(iterations):
        residual = logy - (log_mu[..., None] + sigma[..., None] * x)
        centre = median(residual)
        scale = 1.4826 * median((residual - centre).abs()) + 1e-12
        u = residual.abs() / (delta * scale)
        log_mu, sigma = solve(torch.where(use, torch.where(u <= 1.0, 1.0, 1.0 / u), 0.0))
    return torch.where(count[..., 0] >= 2, sigma, torch.zeros_like(sigma))


# pairs of entries of the weighted sums S = sum w (1, x, x^2, l, x l, -x, -x l, -l) (l = log y) whose products,
# summed in twos, give the 2x2 normal equations' determinant and numerators: [det, num(log mu), num(sigma)]
_NORMAL_PAIRS = (0, 2, 1, 5,  2, 3, 1, 6,  0, 4, 1, 7)


def _weighted_line(weights: torch.Tensor, features: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Weighted least squares of l = log mu + sigma x for P problems at once: weights (P, 1, R), features (P, R, 8)
    as in `_NORMAL_PAIRS`. Returns (P, 1, 3) [1, log mu, sigma] (nan where the system is singular)."""
    sums = torch.bmm(weights, features)  # (P, 1, 8)
    solution = sums.index_select(-1, pairs).view(*sums.shape[:2], 3, 2, 2).prod(-1).sum(-1)  # [det, n_mu, n_sigma]
    return solution / solution[..., :1]


def auto_trend(scores: torch.Tensor, valid: torch.Tensor, ranks: torch.Tensor, axis_start: torch.Tensor,
               axis_length: torch.Tensor, padding: torch.Tensor | None = None, delta: float = 1.0,
               iterations: int = 20) -> torch.Tensor:
    """The "auto" positional trend exp(sigma x) of a padded batch, every axis (image) of every sample fitted at once
    with `robust_sigma`'s robust fit (the same numbers to rounding); no host synchronisation, no loop over samples
    or images; its op count does not depend on the batch (about 20 per IRLS iteration).

    scores (B, R) visual-token scores; valid (B, R) bool (False: padding of the batch); ranks (B, R) long, each
    token's index among its sample's visual tokens; axis_start, axis_length (B, A) long: each sample's positional
    axes (`Debias.axes`: offset and length in ranks; length 0 for unused slots); padding (B, R) bool or None: image
    padding, left out of the fit. A token of axis a sits at x = (rank - start) / length. Returns (B, R) float32:
    the trend on each axis' tokens, 1 elsewhere (tokens on no axis, invalid slots) and where an axis has fewer
    than 2 usable points.

    Ops per IRLS iteration: residual (1 bmm), median of the residuals and of their deviations (sort, gather, sum
    each), Huber weights (4 elementwise), weighted solve (bmm + 5). Weights are kept scaled by a constant
    (min(2 / (1.4826 delta), (2 MAD + e) / |r|)), which leaves the least-squares solution unchanged.
    """
    batch, width = scores.shape
    offset = ranks[:, None, :] - axis_start[:, :, None]  # (B, A, R)
    inside = (offset >= 0) & (offset < axis_length[:, :, None]) & valid[:, None, :]
    x = offset.double() / axis_length.clamp(min=1)[:, :, None]
    y = scores.double()[:, None, :]
    use = inside & (y > 0) & torch.isfinite(y)
    if padding is not None:
        use = use & ~padding[:, None, :]
    logy = torch.log(torch.where(use, y, 1.0))  # 0 where unused
    problems = x.shape[0] * x.shape[1]
    x, logy = x.view(problems, 1, width), logy.view(problems, 1, width)
    use, inside = use.view(problems, 1, width), inside.view(problems, 1, width)
    logy_unused_inf = torch.where(use, logy, float("inf"))  # unused residuals sort last and weigh 0
    features = torch.cat([torch.ones_like(x), x, x * x, logy, x * logy], dim=1)  # (P, 5, R)
    features = torch.cat([features, -features[:, [1, 4, 3]]], dim=1).transpose(1, 2)  # (P, R, 8)
    design = torch.cat([logy_unused_inf, torch.full_like(x, -1.0), -x], dim=1)  # (P, 3, R): r = [1, a, s] @ design
    count = use.sum(dim=-1, keepdim=True)  # (P, 1, 1)
    middle = torch.cat([(count - 1) // 2, count // 2], dim=-1).clamp(min=0)  # (P, 1, 2): numpy's two middle points
    pairs = torch.tensor(_NORMAL_PAIRS, device=scores.device)
    epsilon, ceiling = 2e-12 / 1.4826, 2.0 / (1.4826 * delta)

    line = _weighted_line(use.double(), features, pairs)
    for _ in range(iterations):
        residual = torch.bmm(line, design)  # (P, 1, R), inf where unused
        centre2 = torch.gather(torch.sort(residual, dim=-1).values, -1, middle).sum(-1, keepdim=True)  # 2 median
        deviation = torch.sub(residual, centre2, alpha=0.5).abs()
        spread2 = torch.gather(torch.sort(deviation, dim=-1).values, -1, middle).sum(-1, keepdim=True)  # 2 MAD
        weights = torch.div(spread2 + epsilon, residual.abs()).clamp(max=ceiling)
        line = _weighted_line(weights, features, pairs)
    sigma = torch.where(count >= 2, line[..., 2:], 0.0)  # (P, 1, 1)
    exponent = torch.where(inside, sigma * x, 0.0).view(batch, -1, width).sum(dim=1)  # axes are disjoint
    return torch.exp(exponent).float()
