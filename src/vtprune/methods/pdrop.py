"""PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction", CVPR 2025; github.com/Cooperx521/PyramidDrop).

Before each stage layer l, the layer about to run scores the visual tokens still present: its own input
layernorm, query and key projections and RoPE at the current positions give the attention the last token of
the prompt (the end of the instruction) pays every token, averaged over heads; the top-k visual tokens stay.
After every cut the sequence is renumbered (compact positions), as in the official code.

Defaults are the debiasing paper's runs (arXiv 2508.17807, scripts/PyramidDrop): cuts before layers
[2, 10, 20] keeping 0.32 / 0.16 / 0.08 of the visual tokens (184 / 92 / 46 of 576: 128 tokens averaged over
the 32 layers). Its debiasing: first stage only, padding threshold 0.01, keep count not lowered.
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

#: published schedule (debias runs): equivalent budget -> visual tokens kept (of 576) after each stage
SCHEDULES = {128: (184, 92, 46)}
LAYERS = (2, 10, 20)


@dataclass
class PyramidDrop(Press):
    """budget: tokens as the papers count them (a count of 576 or a fraction; default 128), mapped to the
        published schedule; or keep: visual tokens present after each stage (counts or fractions of the image's).
    layer: the layers before which tokens are cut (default [2, 10, 20], moved to the same relative depth on
        models with other than 32 layers).
    positions: "compact" (official) or "original"."""

    budget: int | float | None = None
    keep: Sequence[int | float] | None = None
    layer: Sequence[int] | None = None
    debias: Debias | None = None
    positions: Positions = "compact"

    name: ClassVar[str] = "pdrop"
    checked: ClassVar[bool] = False
    summary: ClassVar[str] = (
        "stages at several layers; last instruction token's attention with the next layer's weights"
    )
    query: ClassVar[str] = "last_instruction"
    profile_name: ClassVar[str] = "pyramiddrop"
    debias_defaults: ClassVar[dict] = {"padding_threshold": 0.01, "drop_padding": False}

    def __post_init__(self) -> None:
        self._check_common()
        self._check_schedule()

    def stages(self, num_layers: int = REFERENCE_LAYERS) -> list[Stage]:
        layers, keeps = self._layers_and_keeps(num_layers, LAYERS, SCHEDULES)
        return [Stage(layer=layer, keep=keep, score_layer=layer) for layer, keep in zip(layers, keeps)]

    def score(self, ctx: StageContext) -> torch.Tensor:
        # the official query row is the last token of the prompt (the end of the instruction)
        return ctx.attention("last")[:, 0]  # (B, R)
