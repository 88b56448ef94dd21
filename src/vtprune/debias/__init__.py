"""Debiasing of attention scores before top-k (arXiv 2508.17807).

Two biases inherited from LLMs distort attention-based token ranking:

* positional (recency): mean attention grows with the token's relative position x = i/L along the image,
  f(x) = mu * exp(sigma * x). Each score is divided by f(i/L) from a profile (built-in, fitted, or a
  per-position curve); mu cancels in top-k.
* padding (attention sink): with pad-to-square preprocessing, patches that are mostly padding collect
  inflated attention. Their score is set to zero, they rank after every real token, and (by default) the
  keep count is lowered to the number of real tokens.

`Debias` holds the switches; the engine applies it to every press's scores in the same way.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from ..adapters.base import VisualSegment


@dataclass(frozen=True)
class Debias:
    """Debiasing switches for a press.

    profile: positional trend: a built-in name (see `vtprune profiles`), a path to a profile JSON, a
        `Profile`, or None for no positional debiasing.
    padding: zero the scores of padding tokens (needs `processor=` and `image_sizes=` on the press call).
    padding_threshold: a token is padding when more than this share of its pixels is padding.
    drop_padding: also lower the keep count to the number of real tokens (as the published FastV code).
        With False, padding tokens fill the budget only when there are fewer real tokens than `keep`.
    stages: debias the first stage only (as published) or every stage.
    """

    profile: "str | os.PathLike | object | None" = None
    padding: bool = True
    padding_threshold: float = 0.5
    drop_padding: bool = True
    stages: Literal["first", "all"] = "first"
    _loaded: object = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (0.0 <= self.padding_threshold < 1.0) or math.isnan(self.padding_threshold):
            raise ValueError(f"padding_threshold={self.padding_threshold} must lie in [0, 1)")
        if self.stages not in ("first", "all"):
            raise ValueError(f"stages={self.stages!r}: use 'first' or 'all'")
        if self.profile is not None:
            from .profiles import load_profile

            object.__setattr__(self, "_loaded", load_profile(self.profile))

    @property
    def loaded_profile(self):
        """The resolved `Profile`, or None."""
        return self._loaded

    def trend(self, segments: Sequence[VisualSegment]) -> torch.Tensor | None:
        """(V,) positional trend f(i/L) for a sample's visual tokens, each image on its own x axis."""
        if self._loaded is None:
            return None
        return torch.cat([self._loaded.trend(segment.length) for segment in segments])

    def apply(
        self,
        scores: torch.Tensor,
        ranks: torch.Tensor,
        segments: Sequence[VisualSegment],
        padding: torch.Tensor | None,
    ) -> torch.Tensor:
        """Debias one sample's scores.

        scores: (R,) scores of the visual tokens still present; ranks: (R,) their indices among the
        sample's visual tokens; padding: (R,) bool or None. Returns (R,) float32.
        """
        out = scores.float()
        trend = self.trend(segments)
        if trend is not None:
            out = out / trend.to(out.device)[ranks]
        if self.padding and padding is not None:
            out = out.masked_fill(padding, 0.0)
        return out


__all__ = ["Debias"]
