"""Random pruning: keeps a uniformly random subset of the visual tokens (a baseline; no model internals)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..engine import StageContext
from ..press import Press, Stage, as_list


@dataclass
class Random(Press):
    """keep/layer as in FastV. seed: seeds a generator created per request, so a request's selection is
    reproducible and independent of global RNG state."""

    keep: int | float | Sequence[int | float] = 64
    layer: int | Sequence[int] = 2
    seed: int = 0
    debias: None = field(default=None, init=False)

    def stages(self) -> list[Stage]:
        layers = list(self.layer) if isinstance(self.layer, (list, tuple)) else [self.layer]
        keeps = as_list(self.keep, len(layers), "keep")
        return [Stage(layer=int(layer), keep=keep, score_layer=None) for layer, keep in zip(layers, keeps)]

    def score(self, ctx: StageContext) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed + 7919 * ctx.stage_index)
        return [torch.rand(len(ranks), generator=generator) for ranks in ctx.visual_ranks]
