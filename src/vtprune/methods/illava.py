"""iLLaVA (Hu et al., "iLLaVA: An Image is Worth Fewer Than 1/3 Input Tokens in Large Multimodal Models",
arXiv 2412.06263; github.com/hulianyuyy/iLLaVA), its language-model stage.

Before decoder layer K the visual tokens are ranked by the last token's attention inside layer K-1 (head
mean). Instead of dropping the r least important tokens, iLLaVA merges them: of the r + 1 lowest-ranked tokens
the best one stays and becomes their rank-weighted mean (weights 1 for itself, 2, ..., r + 1 for the lower
ones, the lowest weighing most, as in the official code); the other r leave. Kept tokens keep their positions.

iLLaVA publishes settings for LLaVA-OneVision and Qwen2-VL only (language-model stage at K = 8 for images,
K = 2 for video, keep ratio 0.7; plus merging inside vision-tower layers, which vtprune does not do: it would
need to change the vision tower's layers themselves). For LLaVA-1.5 vtprune defaults to K = 2 (where the
debiasing paper prunes every method) and the budget's token count. Debiasing: the language-model stage's
attention, first stage only (the paper gives no code for it); padding tokens are dropped, not merged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from ..context import StageContext
from ..debias import Debias
from ..press import REFERENCE_LAYERS, Press, budget_fraction
from ..stages import Kept, Positions, Stage


@dataclass
class ILLaVA(Press):
    """budget: visual tokens kept (a count of 576 or a fraction; default 128), or keep: per stage, a count or a
        fraction of the image's tokens.
    layer: the decoder layer(s) K before which tokens are merged away (default 2).
    positions: "original" (official) or "compact"."""

    budget: int | float | None = None
    keep: int | float | Sequence[int | float] | None = None
    layer: int | Sequence[int] = 2
    debias: Debias | None = None
    positions: Positions = "original"

    name: ClassVar[str] = "illava"
    summary: ClassVar[str] = "last-token attention in layer K-1; the lowest tokens merged (rank-weighted) into the best of them"
    query: ClassVar[str] = "last"

    def __post_init__(self) -> None:
        self._check_common()
        self._check_schedule()

    def stages(self, num_layers: int = REFERENCE_LAYERS) -> list[Stage]:
        layers, keeps = self._layers_and_keeps(num_layers, [2], default_keep=budget_fraction(128))
        for layer in layers:
            if layer < 1:
                raise ValueError(f"iLLaVA: layer={layer} is out of range: it uses layer K-1's attention, so K >= 1")
        return [Stage(layer=layer, keep=keep, score_layer=layer - 1) for layer, keep in zip(layers, keeps)]

    def select(self, ctx: StageContext) -> list[Kept]:
        ranked = ctx.debias([rows[0] for rows in ctx.attention("last")])
        hidden = ctx.hidden_states(ctx.stage.layer)  # what enters layer K
        decisions = []
        for b, ranks in enumerate(ctx.visual_ranks):
            keep = ctx.keep_count(b)
            padding = ctx.padding[b] if ctx.debias_padding else None
            scores = ranked[b] if padding is None else torch.where(padding, float("-inf"), ranked[b])
            order = torch.argsort(scores, descending=True, stable=True)  # best first
            merged = len(ranks) - keep
            if merged == 0:
                decisions.append(Kept(ranks=torch.sort(ranks).values))
                continue
            group = order[keep - 1:]  # the destination (best of the lowest r + 1), then the lower ones
            weights = torch.arange(1, len(group) + 1, device=ranks.device, dtype=torch.float32)
            if padding is not None:  # padding is dropped, not merged (it would weigh most, being ranked lowest)
                weights = torch.where(padding[group], 0.0, weights).index_fill_(0, torch.zeros(1, dtype=torch.long, device=ranks.device), 1.0)
            values = hidden[b, ctx.visual_slots[b][group]].float()
            destination = (weights[:, None] * values).sum(dim=0) / weights.sum()
            kept_order = order[:keep]
            kept = ranks[kept_order]
            sort = torch.argsort(kept)
            new_values = hidden[b, ctx.visual_slots[b][kept_order]].clone()
            new_values[-1] = destination.to(hidden.dtype)  # order[keep - 1] is the destination
            decisions.append(Kept(ranks=kept[sort], values=new_values[sort]))
        return decisions
