"""iLLaVA (Hu et al., "iLLaVA: An Image is Worth Fewer Than 1/3 Input Tokens in Large Multimodal Models",
arXiv 2412.06263; github.com/hulianyuyy/iLLaVA), its language-model stage.

Before decoder layer K the visual tokens are ranked by the last token's attention inside layer K-1 (head
mean). Instead of dropping the r least important tokens, iLLaVA merges them: of the r + 1 lowest-ranked tokens
the best one stays and becomes their rank-weighted mean (weights 1 for itself, 2, ..., r + 1 for the lower
ones, the lowest weighing most, as in the official code); the other r leave. Kept tokens keep their positions.

The vision-tower stage (`vit_layers`): inside each of those vision layers, after its attention, the patches
are ranked by the attention they receive (mean over heads and all query rows) and the same rule merges
`vit_merge` of them (the [CLS] token is never merged); later vision layers run on fewer tokens and the language
model's input loses them (renumbered, as in the official code). iLLaVA publishes settings for LLaVA-OneVision
(SigLIP) and Qwen2-VL only: vision layers 5-8 merging 92 each, language-model stage at K = 8 (K = 2 for video)
with keep ratio 0.7. For LLaVA-1.5 vtprune defaults to the language-model stage alone at K = 2 (where the
debiasing paper prunes every method) keeping the budget's token count; `vit_layers=(5, 6, 7, 8), vit_merge=92`
transfers the published image setting (576 -> 208 patches before the language model). Debiasing: the language-model stage's
attention, first stage only (the paper gives no code for it); padding tokens are dropped, not merged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.context import StageContext, VisionStageContext
from ..core.press import REFERENCE_LAYERS, Press, budget_fraction, layer_list
from ..core.selection import illava_merge
from ..core.stages import Kept, Positions, Stage, VisionStage
from ..debias import Debias


@dataclass
class ILLaVA(Press):
    """budget: visual tokens kept (a count of 576 or a fraction; default 128), or keep: per stage, a count or a
        fraction of the image's tokens.
    layer: the decoder layer(s) K before which tokens are merged away (default 2).
    vit_layers: vision-tower layers that merge inside themselves (default none); vit_merge: patches of each
        image merged away in each of them (a count, or a fraction of the patches present).
    positions: "original" (official) or "compact", for the language-model stages."""

    budget: int | float | None = None
    keep: int | float | Sequence[int | float] | None = None
    layer: int | Sequence[int] = 2
    vit_layers: Sequence[int] = ()
    vit_merge: int | float = 92
    debias: Debias | None = None
    positions: Positions = "original"

    name: ClassVar[str] = "illava"
    checked: ClassVar[bool] = False
    summary: ClassVar[str] = (
        "last-token attention in layer K-1; the lowest tokens merged (rank-weighted) into the best of them"
    )
    query: ClassVar[str] = "last"

    def __post_init__(self) -> None:
        self._check_common()
        self._check_schedule()
        layer_list(list(self.vit_layers), "vit_layers")
        if isinstance(self.vit_merge, bool) or not isinstance(self.vit_merge, (int, float)) or self.vit_merge < 0:
            raise ValueError(f"iLLaVA: vit_merge={self.vit_merge!r} must be a count >= 0 or a fraction")

    def stages(self, num_layers: int = REFERENCE_LAYERS) -> list[Stage]:
        layers, keeps = self._layers_and_keeps(num_layers, [2], default_keep=budget_fraction(128))
        for layer in layers:
            if layer < 1:
                raise ValueError(f"iLLaVA: layer={layer} is out of range: it uses layer K-1's attention, so K >= 1")
        stages = [Stage(layer=layer, keep=keep, score_layer=layer - 1) for layer, keep in zip(layers, keeps)]
        if self.vit_layers:  # the language model's input loses what the vision tower merged away (renumbered)
            stages.insert(0, Stage(layer=0, keep=1.0, score_layer=None, positions="compact"))
        return stages

    def vision_stages(self, num_vision_layers: int) -> list[VisionStage]:
        return [VisionStage(layer=layer, merge=self.vit_merge) for layer in self.vit_layers]

    def select_vision(self, vctx: VisionStageContext) -> tuple[torch.Tensor, torch.Tensor]:
        received = vctx.attention().mean(dim=1)  # (N, T): attention each token receives, mean over heads and rows
        if vctx.adapter.vision_cls_index is not None:  # the [CLS] token is never merged
            received = received.index_fill(
                1, torch.tensor([vctx.adapter.vision_cls_index], device=received.device), float("inf")
            )
        order = torch.argsort(received, dim=1, descending=True, stable=True)
        length, merge = received.shape[1], vctx.merge
        keep = torch.sort(order[:, : length - merge], dim=1).values
        values = torch.gather(vctx.output, 1, keep[:, :, None].expand(-1, -1, vctx.output.shape[-1])).clone()
        if merge:
            group = order[:, length - merge - 1 :]  # (N, merge + 1): the destination, then the lower ones
            weights = torch.arange(1, merge + 2, device=group.device, dtype=torch.float32)
            residual = torch.gather(
                vctx.post_attention(), 1, group[:, :, None].expand(-1, -1, values.shape[-1])
            ).float()
            merged = (weights[None, :, None] * residual).sum(dim=1) / weights.sum()  # (N, D)
            destination = (keep == group[:, :1]).float().argmax(dim=1)  # where the destination sits in `keep`
            values[torch.arange(len(keep), device=keep.device), destination] = vctx.finish(merged.to(values.dtype))
        return keep, values

    def select(self, ctx: StageContext) -> Kept | torch.Tensor:
        if ctx.stage.layer == 0:  # after the vision stages
            return ctx.vision_survivors()
        scores = ctx.debias(ctx.attention("last")[:, 0])  # (B, R)
        padding = ctx.padding_mask if ctx.debias_padding else None
        share = ctx.padding_share_batched if padding is not None and ctx.padding_fractions else None
        counts = ctx.keep_counts()
        same = min(counts) == max(counts)
        full = all(count == ctx.ranks.shape[1] for count in ctx.present_counts)  # host facts: no mask, one keep
        indices, kept, values = illava_merge(
            scores.float(),
            None if full else ctx.present,
            ctx.visual_hidden_states(ctx.stage.layer),  # what enters layer K
            counts[0] if same else torch.tensor(counts, device=ctx.ranks.device),
            max(counts),
            padding,
            share,
        )
        if same:  # every index is a token
            ranks = torch.gather(ctx.ranks, 1, indices)
        else:
            ranks = torch.where(kept, torch.gather(ctx.ranks, 1, indices.clamp(max=ctx.ranks.shape[1] - 1)), -1)
        return Kept(ranks=ranks, values=values, counts=None if min(counts) == max(counts) else counts)
