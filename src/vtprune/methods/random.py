"""Random pruning: keeps a uniformly random subset of the visual tokens (a baseline; no model internals).
`layer=0` prunes at the language model's input, so every decoder layer runs on the shorter sequence."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch

from ..context import StageContext
from ..press import REFERENCE_LAYERS, Press
from ..stages import Positions, Stage


@dataclass
class Random(Press):
    """keep/budget/layer as in FastV (layer 0: at the language model's input). seed: seeds a generator created
    per sample and stage, so a selection is reproducible, independent of global RNG state and of the batch
    (every image with the same number of tokens gets the same random subset for a given seed)."""

    keep: int | float | Sequence[int | float] | None = None
    layer: int | Sequence[int] = 2
    budget: int | float | None = None
    seed: int = 0
    positions: Positions = "original"
    debias: None = field(default=None, init=False)

    name: ClassVar[str] = "random"
    summary: ClassVar[str] = "a seeded uniformly random subset (baseline; no model internals)"

    def __post_init__(self) -> None:
        self._check_common()
        self._check_schedule()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if not 0 <= self.seed <= 2**63 - 1:  # torch.Generator.manual_seed's range
            raise ValueError(f"Random: seed={self.seed} must lie in 0..2**63-1")

    def stages(self, num_layers: int = REFERENCE_LAYERS) -> list[Stage]:
        layers, keeps = self._layers_and_keeps(num_layers, [2])
        return [Stage(layer=layer, keep=keep, score_layer=None) for layer, keep in zip(layers, keeps)]

    def score(self, ctx: StageContext) -> list[torch.Tensor]:
        scores = []
        for b, ranks in enumerate(ctx.visual_ranks):
            generator = torch.Generator(device=ranks.device).manual_seed(self.seed + 7919 * ctx.stage_index)
            # one value per rank, drawn on the device: batch-independent, no host round trip
            draw = torch.rand(ctx.num_visual[b] + len(ranks), generator=generator, device=ranks.device)
            scores.append(draw[ranks])
        return scores

    def select(self, ctx: StageContext):
        return ctx.top_k(self.score(ctx))
