"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024).

Before decoder layer K, rank the visual tokens by the attention the last token paid them inside layer K-1,
averaged over heads, and keep the top R; layers 0..K-1 see every token. Defaults follow the official code
for LLaVA-1.5-7B (K=2). Several layers/keeps make a schedule: each stage re-ranks what the previous kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from ..debias import Debias
from ..engine import StageContext
from ..press import Press, Stage, as_list


@dataclass
class FastV(Press):
    """keep: visual tokens to keep (int count, or float fraction of the image's tokens), one per stage.
    layer: decoder layer(s) before which tokens are dropped (K in the paper).
    debias: `Debias(...)` to debias the scores, or None."""

    keep: int | float | Sequence[int | float] = 64
    layer: int | Sequence[int] = 2
    debias: Debias | None = None
    query: ClassVar[str] = "last"

    def stages(self) -> list[Stage]:
        layers = list(self.layer) if isinstance(self.layer, (list, tuple)) else [self.layer]
        keeps = as_list(self.keep, len(layers), "keep")
        return [Stage(layer=int(layer), keep=keep, score_layer=int(layer) - 1) for layer, keep in zip(layers, keeps)]

    def score(self, ctx: StageContext) -> list[torch.Tensor]:
        last = ctx.last_token_slot()[:, None]  # (B, 1)
        return ctx.attention_to_visual(last)
