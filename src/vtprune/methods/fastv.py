"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024).

Before decoder layer K, rank the visual tokens by the attention the last token paid them inside layer K-1,
averaged over heads, and keep the top R; layers 0..K-1 see every token. Defaults follow the official code
for LLaVA-1.5-7B (K=2). Several layers/keeps make a schedule: each stage re-ranks what the previous kept.
Debiasing (arXiv 2508.17807's FastV patch): padding threshold 0.5, keep count lowered to the real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.context import StageContext
from ..core.press import REFERENCE_LAYERS, Press
from ..core.stages import Positions, Stage
from ..debias import Debias


@dataclass
class FastV(Press):
    """keep: visual tokens to keep (int count, or float fraction of the image's tokens), one per stage
        (default 64). budget: instead of keep, the budget as the FastV rows of the papers label it (keep R=budget
        tokens of 576, or a fraction); `equivalent_tokens()` reports the layer-averaged count.
    layer: decoder layer(s) before which tokens are dropped (K in the paper).
    debias: `Debias(...)` to debias the scores, or None.
    positions: "original" (the official code) or "compact"."""

    keep: int | float | Sequence[int | float] | None = None
    layer: int | Sequence[int] = 2
    budget: int | float | None = None
    debias: Debias | None = None
    positions: Positions = "original"

    name: ClassVar[str] = "fastv"
    checked: ClassVar[bool] = False
    summary: ClassVar[str] = "last token's head-averaged attention in layer K-1; top-k before layer K"
    query: ClassVar[str] = "last"
    debias_defaults: ClassVar[dict] = {"padding_threshold": 0.5, "drop_padding": True}

    def __post_init__(self) -> None:
        self._check_common()
        self._check_schedule()

    def stages(self, num_layers: int = REFERENCE_LAYERS) -> list[Stage]:
        layers, keeps = self._layers_and_keeps(num_layers, [2])
        for layer in layers:
            if layer < 1:
                raise ValueError(
                    f"FastV: layer={layer} is out of range: FastV scores with the attention inside layer K-1, so it "
                    "prunes before layer 1 or later (Random(layer=0) prunes the language model's input)."
                )
        return [Stage(layer=layer, keep=keep, score_layer=layer - 1) for layer, keep in zip(layers, keeps)]

    def score(self, ctx: StageContext) -> torch.Tensor:
        return ctx.attention("last")[:, 0]  # (B, R)
