"""Random pruning: keeps a uniformly random subset of the visual tokens (a baseline; no model internals).
`layer=0` prunes at the language model's input, so every decoder layer runs on the shorter sequence."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..core.context import StageContext
from ..core.press import REFERENCE_LAYERS, Press
from ..core.stages import Positions, Stage


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
    checked: ClassVar[bool] = False
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

    def score(self, ctx: StageContext) -> torch.Tensor:
        # one value per rank, drawn on the device from a generator seeded per stage and per draw length (a
        # sample's V_b + tokens present): batch-independent, no host round trip
        device = ctx.ranks.device
        lengths = [visual + present for visual, present in zip(ctx.num_visual, ctx.present_counts)]
        draws = {}
        for length in sorted(set(lengths)):
            generator = torch.Generator(device=device).manual_seed(self.seed + 7919 * ctx.stage_index)
            draws[length] = torch.rand(length, generator=generator, device=device)
        if len(draws) == 1:
            table = draws[lengths[0]][None].expand(len(lengths), -1)
        else:
            table = torch.nn.utils.rnn.pad_sequence([draws[length] for length in lengths], batch_first=True)
        ranks = ctx.ranks if min(ctx.present_counts) == ctx.ranks.shape[1] else ctx.ranks.clamp(min=0)
        return torch.gather(table, 1, ranks)  # (B, R)

    def select(self, ctx: StageContext):
        return ctx.top_k(self.score(ctx))
