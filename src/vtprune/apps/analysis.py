"""Bias metrics of a pruning method's first-stage scores, before and after debiasing (`vtprune analyze`).

From `runner.ScoreRecord`s (one per example, run with a debiasing press):

* sigma_attn: sigma of the exponential fit of the mean score per position (`calibrate.mean_score_curve`,
  real tokens, per-image normalised); "before" on the raw scores, "after" on the debiased ones.
* sigma_freq: sigma of the fit of how often each position is kept by top-k (among images where it is a real
  token); before = top-k of the raw scores, after = the press's debiased selection. The paper reports this is
  larger than sigma_attn (FastV on LLaVA-1.5-7B: 0.91 -> 2.56) and near 0 after debiasing.
* padding_score_share: padding tokens' share of the total visual score, averaged over images with padding.
* padding_kept_share: share of the kept tokens that are padding, averaged over examples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..debias.fit import ExpFit
from .calibration import PositionCurve, keep_frequency, mean_score_curve


@dataclass
class BeforeAfter:
    before: float | None
    after: float | None


@dataclass
class BiasReport:
    samples: int
    keep: float  # mean tokens kept per example (after debiasing's padding cap)
    num_visual: float  # mean visual tokens per example
    sigma_attn: BeforeAfter
    r2_attn: BeforeAfter
    sigma_freq: BeforeAfter
    padding_score_share: BeforeAfter
    padding_kept_share: BeforeAfter
    curves: dict[str, PositionCurve] = field(default_factory=dict, repr=False)
    fits: dict[str, ExpFit] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k not in ("curves", "fits")}
        data["curves"] = {name: _nan_to_none(curve.values) for name, curve in self.curves.items()}
        data["grid"] = list(next(iter(self.curves.values())).grid) if self.curves else None
        data["fits"] = {name: {"mu": fit.mu, "sigma": fit.sigma, "r2": fit.r2} for name, fit in self.fits.items()}
        return data

    def save(self, path: str | Path) -> Path:
        from ..io import atomic_write_json

        return atomic_write_json(path, self.to_dict())

    def rows(self) -> list[tuple[str, str, str]]:
        """(metric, before, after) formatted for a table."""

        def fmt(value, pct=False):
            if value is None:
                return "n/a"
            return f"{100 * value:.1f}%" if pct else f"{value:+.3f}"

        return [
            ("sigma_attn (fit on mean score)", fmt(self.sigma_attn.before), fmt(self.sigma_attn.after)),
            (
                "R^2 of that fit",
                f"{self.r2_attn.before:.3f}",
                "n/a" if self.r2_attn.after is None else f"{self.r2_attn.after:.3f}",
            ),
            ("sigma_freq (fit on keep frequency)", fmt(self.sigma_freq.before), fmt(self.sigma_freq.after)),
            (
                "padding share of total score",
                fmt(self.padding_score_share.before, True),
                fmt(self.padding_score_share.after, True),
            ),
            (
                "padding share of kept tokens",
                fmt(self.padding_kept_share.before, True),
                fmt(self.padding_kept_share.after, True),
            ),
        ]


def _nan_to_none(values: np.ndarray) -> list:
    return [None if not np.isfinite(v) else float(v) for v in values]


def _safe_fit(curve: PositionCurve) -> ExpFit | None:
    try:
        return curve.fit()
    except ValueError:
        return None  # e.g. a keep frequency that is zero almost everywhere


def _padding_score_share(records, which: str) -> float | None:
    shares = []
    for record in records:
        values = getattr(record, which)
        if record.padding is None or values is None or not record.padding.any():
            continue
        finite = np.isfinite(values)
        total = values[finite].sum()
        if total > 0:
            shares.append(values[finite & record.padding].sum() / total)
    return float(np.mean(shares)) if shares else None


def _padding_kept_share(records, which: str) -> float | None:
    if not records or any(r.padding is None for r in records):
        return None
    return float(np.mean([r.padding[getattr(r, which)].mean() for r in records]))


def bias_report(records) -> BiasReport:
    """Metrics of `records` (from `runner.run_examples` with a press that debiases)."""
    if not records:
        raise ValueError("no scored examples to analyse")
    debiased = records[0].debiased is not None
    curves = {"score_before": mean_score_curve(records, "raw"), "freq_before": keep_frequency(records, "kept_raw")}
    if debiased:
        curves["score_after"] = mean_score_curve(records, "debiased")
        curves["freq_after"] = keep_frequency(records, "kept")
    fits = {name: fit for name, fit in ((n, _safe_fit(c)) for n, c in curves.items()) if fit is not None}

    def sigma(name):
        return fits[name].sigma if name in fits else None

    return BiasReport(
        samples=len(records),
        keep=float(np.mean([len(r.kept) for r in records])),
        num_visual=float(np.mean([len(r.raw) for r in records])),
        sigma_attn=BeforeAfter(sigma("score_before"), sigma("score_after")),
        r2_attn=BeforeAfter(fits["score_before"].r2, fits["score_after"].r2 if "score_after" in fits else None),
        sigma_freq=BeforeAfter(sigma("freq_before"), sigma("freq_after")),
        padding_score_share=BeforeAfter(
            _padding_score_share(records, "raw"), _padding_score_share(records, "debiased") if debiased else None
        ),
        padding_kept_share=BeforeAfter(
            _padding_kept_share(records, "kept_raw"), _padding_kept_share(records, "kept") if debiased else None
        ),
        curves=curves,
        fits=fits,
    )


__all__ = ["BiasReport", "BeforeAfter", "bias_report"]
