"""FasterVLM (Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM
Inference Faster", arXiv 2412.01818; github.com/Theia-4869/FasterVLM).

Before the language model: each image keeps the patches that the vision tower's [CLS] token attends to most
inside its feature layer (LLaVA-1.5: the second-to-last, the layer the features come from), averaged over
heads. The language model runs on the shorter input (its positions renumbered, as in the official code).
The official code has no debiasing; vtprune offers the same padding/positional debiasing of the [CLS] scores
(see the README for what it measured).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.context import StageContext
from ..core.press import REFERENCE_LAYERS, Press
from ..core.stages import Positions, Stage
from ..debias import Debias


@dataclass
class FasterVLM(Press):
    """budget: visual tokens kept per image as the papers count them (a count of 576 or a fraction; default
        128); or keep: a count per image or a fraction of each image's tokens.
    vision_layer: the vision-tower layer whose [CLS] attention ranks the patches (default -2, LLaVA-1.5's
        feature layer).
    positions: "compact" (official: the image simply has fewer tokens) or "original"."""

    budget: int | float | None = None
    keep: int | float | None = None
    vision_layer: int = -2
    debias: Debias | None = None
    positions: Positions = "compact"

    name: ClassVar[str] = "fastervlm"
    checked: ClassVar[bool] = False
    summary: ClassVar[str] = "vision tower's [CLS] attention (feature layer, head mean); top-k per image before the LLM"
    query: ClassVar[str] = "cls"

    def __post_init__(self) -> None:
        self._check_common()
        if isinstance(self.vision_layer, bool) or not isinstance(self.vision_layer, int):
            raise TypeError(f"vision_layer must be an int, got {self.vision_layer!r}")
        self._check_schedule()

    def stages(self, num_layers: int = REFERENCE_LAYERS) -> list[Stage]:
        return [Stage(layer=0, keep=self._single_keep(), score_layer=None)]

    def vision_layers(self) -> tuple[int, ...]:
        return (self.vision_layer,)

    def score(self, ctx: StageContext) -> torch.Tensor:
        return ctx.vision_attention(self.vision_layer)

    def select(self, ctx: StageContext):
        return ctx.top_k_per_image(ctx.debias(self.score(ctx)))
