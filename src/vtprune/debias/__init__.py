"""Debiasing of attention scores before top-k (arXiv 2508.17807).

Two biases inherited from LLMs distort attention-based token ranking:

* positional (recency): mean attention grows with the token's relative position x = i/L along the image,
  f(x) = mu * exp(sigma * x). Each score is divided by f(i/L) from a profile (built-in, fitted, or a
  per-position curve); mu cancels in top-k.
* padding (attention sink): with pad-to-square preprocessing, patches that are mostly padding collect
  inflated attention. Their score is set to zero, they rank after every real token, and (by default) the
  keep count is lowered to the number of real tokens.

`Debias` holds the switches; a method applies it to the attention-derived part of its score through
`StageContext.debias`, the same function for every method.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from ..adapters.base import VisualSegment


@dataclass(frozen=True)
class Debias:
    """Debiasing switches for a press.

    profile: positional trend: a built-in name (see `vtprune profiles`), a path to a profile JSON, a
        `Profile`, "auto" (fit the trend on each request's own scores, robustly: no calibration), "default"
        (the built-in profile of the model and method: the published LLaVA-1.5-7B ones, the testbed's
        calibrated ones; an error where there is none), "rowrank" or "rowmean" (per request, no calibration: each
        score ranked within, or divided by the mean of, its image row; `debias.corrections`), or None for no
        positional debiasing.
    padding: zero the scores of padding tokens (needs `processor=` and `image_sizes=` on the press call).
    padding_threshold: a token is padding when more than this share of its pixels is padding; None: the
        method's published value (FastV, HiMAP, SparseVLM 0.5; PyramidDrop 0.01).
    drop_padding: also lower the keep count to the number of real tokens (as the published FastV code);
        with False, padding tokens rank last and fill the budget only when there are fewer real tokens than
        `keep`. None: the method's published behaviour (True for FastV, False for the others).
    stages: debias the first stage only (as published) or every stage.
    video_axis: the positional axis of a video's tokens: "video" (default; i/L along the whole visual sequence of
        the video, its frames one after another, as the published code ranks one contiguous block of visual
        tokens) or "frame" (each frame on its own axis, like an image).
    """

    profile: str | os.PathLike | object | None = None
    padding: bool = True
    padding_threshold: float | None = None
    drop_padding: bool | None = None
    stages: Literal["first", "all"] = "first"
    video_axis: Literal["video", "frame"] = "video"
    _loaded: Any = field(default=None, init=False, repr=False, compare=False)  # the loaded Profile
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.padding, bool):
            raise TypeError(f"padding={self.padding!r} must be True or False")
        if self.padding_threshold is not None and (
            isinstance(self.padding_threshold, bool)
            or not isinstance(self.padding_threshold, (int, float))
            or math.isnan(self.padding_threshold)
            or not (0.0 <= self.padding_threshold < 1.0)
        ):
            raise ValueError(f"padding_threshold={self.padding_threshold!r} must lie in [0, 1)")
        if self.drop_padding is not None and not isinstance(self.drop_padding, bool):
            raise TypeError(f"drop_padding={self.drop_padding!r} must be True, False or None")
        if self.video_axis not in ("video", "frame"):
            raise ValueError(
                f"video_axis={self.video_axis!r}: use 'video' (the whole visual sequence of a video) or 'frame'"
            )
        if self.stages not in ("first", "all"):
            raise ValueError(f"stages={self.stages!r}: use 'first' or 'all'")
        if self.profile is not None and self.profile not in ("auto", "default", "rowrank", "rowmean"):
            from .profiles import load_profile

            object.__setattr__(self, "_loaded", load_profile(self.profile))  # type: ignore[arg-type]  # a Profile is an object

    def for_model(self, config, method: str, profile_name: str | None = None) -> Debias:
        """A copy with profile="default" resolved to the built-in profile of this model and method."""
        if self.profile != "default":
            return self
        from .profiles import default_profile_name

        name = default_profile_name(config, method, profile_name)
        if name is None:
            model = getattr(config, "_name_or_path", "") or "this model"
            raise ValueError(
                f"no built-in positional profile for {method} on {model}: calibrate one (`vtprune calibrate`) and "
                "pass its path, or use Debias(profile='auto')."
            )
        resolved = replace(self, profile=name)
        return resolved

    def with_defaults(self, padding_threshold: float, drop_padding: bool) -> Debias:
        """A copy whose unset (None) fields take a method's published values."""
        resolved = replace(
            self,
            padding_threshold=padding_threshold if self.padding_threshold is None else self.padding_threshold,
            drop_padding=drop_padding if self.drop_padding is None else self.drop_padding,
        )
        object.__setattr__(resolved, "_loaded", self._loaded)
        return resolved

    @property
    def loaded_profile(self):
        """The resolved `Profile`, or None (also for "auto")."""
        return self._loaded

    @property
    def positional(self) -> bool:
        return self.profile is not None

    def describe(self) -> str:
        positional = "off" if self.profile is None else (self.profile if self._loaded is None else self._loaded.name)
        return f"positional {positional}, padding {'on' if self.padding else 'off'}"

    def trend(self, segments: Sequence[VisualSegment]) -> torch.Tensor | None:
        """(V,) positional trend f(i/L) of a calibrated profile for a sample's visual tokens, each image on
        its own x axis; None without a calibrated profile."""
        if self._loaded is None:
            return None
        return torch.cat([self._loaded.trend(segment.length) for segment in segments])

    def _trend_on(self, segments: Sequence[VisualSegment], device) -> torch.Tensor:
        """`trend` on `device`, cached per image-length layout (no host-to-device copy per request)."""
        key = (tuple(segment.length for segment in segments), str(device))
        cache = self._cache
        if key not in cache:
            cache[key] = self.trend(segments).to(device)
        return cache[key]

    def apply(
        self,
        scores: torch.Tensor,
        ranks: torch.Tensor,
        segments: Sequence[VisualSegment],
        padding: torch.Tensor | None,
    ) -> torch.Tensor:
        """Debias one sample's scores.

        scores: (R,) scores of the visual tokens still present; ranks: (R,) the rank whose position each has
        (its index among the sample's visual tokens); padding: (R,) bool or None. Returns (R,) float32.
        """
        present = torch.ones(ranks.shape, dtype=torch.bool, device=ranks.device)
        return self.apply_batch(
            scores[None], ranks[None], present[None], [segments], None if padding is None else padding[None]
        )[0]

    def axes(self, segments: Sequence[VisualSegment]) -> list[VisualSegment]:
        """The positional axes of a sample: its segments, with a video's frames joined into one axis when
        video_axis="video"."""
        if self.video_axis == "frame":
            return list(segments)
        out: list[VisualSegment] = []
        for segment in segments:
            last = out[-1] if out else None
            if (
                segment.kind == "frame"
                and last is not None
                and last.kind == "frame"
                and last.part == segment.part
                and last.image_index == segment.image_index
                and last.offset + last.length == segment.offset
            ):
                out[-1] = replace(last, length=last.length + segment.length, grid=(1, last.length + segment.length))
            else:
                out.append(segment)
        return out

    def apply_batch(
        self,
        scores: torch.Tensor,
        ranks: torch.Tensor,
        present: torch.Tensor,
        segments: Sequence[Sequence[VisualSegment]],
        padding: torch.Tensor | None = None,
        cache: dict | None = None,
    ) -> torch.Tensor:
        """`apply` for a batch: scores (B, R), ranks (B, R) the rank whose position each token has, present (B, R)
        bool (False: an entry of a sample with fewer tokens), segments per sample, padding (B, R) bool or None.
        Returns (B, R) float32. Batched (no loop over samples or images, no host synchronisation); "auto" fits
        every image of every sample at once (`fit.auto_trend`)."""
        out = scores.float()
        if self.profile == "auto":
            from .fit import auto_trend

            start, length = self._axis_tables(segments, out.device)
            out = out / auto_trend(out, present, ranks, start, length, padding)
        elif self.profile in ("rowrank", "rowmean"):
            from .corrections import row_mean, row_rank

            start, length = self._axis_tables(segments, out.device)
            correct = row_rank if self.profile == "rowrank" else row_mean
            out = correct(out, present, ranks, start, length, self._axis_columns(segments, out.device), padding)
        elif self._loaded is not None:
            table = self._trend_table(segments, out.device)  # (B, max V + 1)
            out = out / torch.gather(table, 1, ranks.clamp(min=0))
        if self.padding and padding is not None:
            out = out.masked_fill(padding, 0.0)
        return out

    def _trend_table(self, segments, device) -> torch.Tensor:
        """(B, max V + 1) the calibrated trend of each sample's visual ranks (1 after its last), cached per layout."""
        key = (
            "trend",
            tuple(tuple((s.offset, s.length, s.kind, s.part, s.image_index) for s in sample) for sample in segments),
            str(device),
        )
        if key not in self._cache:
            rows = [self.trend(self.axes(sample)).float() for sample in segments]
            width = max(len(row) for row in rows) + 1
            table = torch.ones(len(rows), width)
            for b, row in enumerate(rows):
                table[b, : len(row)] = row
            self._cache[key] = table.to(device)
        return self._cache[key]

    def _axis_tables(self, segments, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) long start and length (in ranks) of each sample's positional axes (length 0: none), cached."""
        key = (
            "axes",
            tuple(tuple((s.offset, s.length, s.kind, s.part, s.image_index) for s in sample) for sample in segments),
            str(device),
        )
        if key not in self._cache:
            axes = [self.axes(sample) for sample in segments]
            width = max(len(sample) for sample in axes)
            start = [[a.offset for a in sample] + [0] * (width - len(sample)) for sample in axes]
            length = [[a.length for a in sample] + [0] * (width - len(sample)) for sample in axes]
            self._cache[key] = (torch.tensor(start, device=device), torch.tensor(length, device=device))
        return self._cache[key]

    def _axis_columns(self, segments, device) -> torch.Tensor:
        """(B, A) long: the patch columns of each sample's positional axes (a video axis is one row), cached."""
        key = (
            "columns",
            tuple(
                tuple((s.offset, s.length, s.kind, s.part, s.image_index, tuple(s.grid)) for s in sample)
                for sample in segments
            ),
            str(device),
        )
        if key not in self._cache:
            axes = [self.axes(sample) for sample in segments]
            width = max(len(sample) for sample in axes)
            columns = [[a.grid[1] for a in sample] + [1] * (width - len(sample)) for sample in axes]
            self._cache[key] = torch.tensor(columns, device=device)
        return self._cache[key]

    @staticmethod
    def _auto_trends(scores, ranks, segments, padding) -> list[torch.Tensor]:
        """Per sample (R,) trend exp(sigma x), sigma from a robust fit on each image's real tokens
        (`fit.robust_sigma`): the per-sample reference of `fit.auto_trend` (lists of per-sample arguments), kept
        for the equivalence tests."""
        from .fit import robust_sigma
        from .profiles import SIGMA_LIMIT

        problems = [(b, segment) for b, sample in enumerate(segments) for segment in sample]
        width = max(len(s) for s in scores)
        device = scores[0].device
        y = torch.zeros(len(problems), width, dtype=torch.float64, device=device)
        x = torch.zeros_like(y)
        use = torch.zeros(len(problems), width, dtype=torch.bool, device=device)
        inside_of = []
        for p, (b, segment) in enumerate(problems):
            count = len(scores[b])
            inside = (ranks[b] >= segment.offset) & (ranks[b] < segment.offset + segment.length)
            y[p, :count] = scores[b].double()
            x[p, :count] = (ranks[b] - segment.offset).double() / segment.length
            use[p, :count] = inside if padding[b] is None else inside & ~padding[b]
            inside_of.append(inside)
        sigma = robust_sigma(y, x, use).clamp(-SIGMA_LIMIT, SIGMA_LIMIT)  # (P,); steeper fits overflow float32
        trends = [torch.ones_like(s) for s in scores]
        for p, (b, _segment) in enumerate(problems):
            count = len(scores[b])
            trend = torch.exp(sigma[p] * x[p, :count]).to(trends[b].dtype)
            trends[b] = torch.where(inside_of[p], trend, trends[b])
        return trends


__all__ = ["Debias"]
