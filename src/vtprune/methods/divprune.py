"""DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models", CVPR
2025; github.com/vbdi/divprune).

Before the language model: each image keeps a maximally diverse subset of its projected visual features,
chosen greedily by max-min cosine distance: first the token whose nearest neighbour is farthest, then
repeatedly the token farthest from everything chosen (ties: the earlier token). No attention is used, so there
is nothing to debias. The language model runs on the shorter input (positions renumbered, as published).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..core.context import StageContext
from ..core.press import REFERENCE_LAYERS, Press
from ..core.selection import max_min_select
from ..core.stages import Kept, Positions, Stage, resolve_keep


@dataclass
class DivPrune(Press):
    """budget: visual tokens kept per image as the papers count them (a count of 576 or a fraction; default
        128; the paper's main setting is 0.098 = 56 of 576); or keep: a count per image or a fraction.
    positions: "compact" (official) or "original"."""

    budget: int | float | None = None
    keep: int | float | None = None
    positions: Positions = "compact"
    debias: None = field(default=None, init=False)

    name: ClassVar[str] = "divprune"
    checked: ClassVar[bool] = False
    summary: ClassVar[str] = "max-min cosine diversity of the projected visual features, per image, before the LLM"

    def __post_init__(self) -> None:
        self._check_common()
        self._check_schedule()

    def stages(self, num_layers: int = REFERENCE_LAYERS) -> list[Stage]:
        return [Stage(layer=0, keep=self._single_keep(), score_layer=None)]

    def select(self, ctx: StageContext) -> Kept:
        """One batched greedy selection over every image of the batch (a problem per image, padded to the
        longest); the keep counts are host facts, so nothing is read back from the device."""
        # at the language model's input every visual token is present, in rank order
        problems = [(b, segment) for b, segments in enumerate(ctx.segments) for segment in segments]
        counts = [
            resolve_keep(ctx.stage.keep, segment.length, segment.length, warn=not ctx.dry_run)
            for _, segment in problems
        ]
        width = max(2, max(segment.length for _, segment in problems))  # the nearest-other search needs 2 columns
        device = ctx.ranks.device
        if (
            [b for b, _ in problems] == list(range(ctx.num_samples))
            and counts == [counts[0]] * len(counts)
            and all(segment.offset == 0 and segment.length == width == ctx.ranks.shape[1] for _, segment in problems)
        ):
            # one image per sample, filling its row, the same count each: no padding, no packing
            picks, _ = max_min_select(ctx.visual_hidden_states(0), None, counts[0])
            return Kept(ranks=torch.gather(ctx.ranks, 1, picks))  # ascending: the ranks are in order here
        sample = torch.tensor([b for b, _ in problems], device=device)
        offset = torch.tensor([segment.offset for _, segment in problems], device=device)
        length = torch.tensor([segment.length for _, segment in problems], device=device)
        column = torch.arange(width, device=device)
        valid = column < length[:, None]  # (P, n)
        rank_column = torch.where(valid, offset[:, None] + column, 0)  # (P, n) column of ctx.ranks
        features = ctx.visual_hidden_states(0)[sample[:, None], rank_column]  # (P, n, D) projected features
        picks, kept = max_min_select(features, valid, max(counts), torch.tensor(counts, device=device))
        # each sample's row: its images' picks one after another (each image's picks ascending)
        sample_counts = [0] * ctx.num_samples
        starts = []
        for (b, _), count in zip(problems, counts):
            starts.append(sample_counts[b])
            sample_counts[b] += count
        total = max(sample_counts)
        slot = torch.tensor(starts, device=device)[:, None] + torch.arange(picks.shape[1], device=device)
        slot = torch.where(kept, slot, total)  # dropped picks go to a spare column
        values = torch.gather(ctx.ranks[sample], 1, torch.where(kept, offset[:, None] + picks, 0))
        row = sample[:, None].expand_as(slot)
        ranks = torch.full((ctx.num_samples, total + 1), torch.iinfo(torch.long).max, dtype=torch.long, device=device)
        ranks = ranks.index_put_((row, slot), values)[:, :total]
        ranks = torch.sort(ranks, dim=1).values
        if min(sample_counts) < total:
            ranks = ranks.masked_fill(ranks == torch.iinfo(torch.long).max, -1)
        return Kept(ranks=ranks, counts=None if min(sample_counts) == total else sample_counts)


def max_min_diverse(features: torch.Tensor, count: int) -> torch.Tensor:
    """Greedy max-min diversity (`count` of the n rows of `features`), with distance 1 - cosine similarity:
    first the row whose nearest other row is farthest, then the row farthest from the chosen set. Returns the
    chosen row indices (count,) in pick order; no host synchronisation. A chosen row is never chosen again (the
    official code can re-pick one when all that remain duplicate the chosen ones, keeping fewer tokens)."""
    unit = features.float() / features.float().norm(dim=1, keepdim=True)
    distance = 1 - unit @ unit.T  # (n, n)
    nearest = torch.topk(distance, min(2, len(features)), dim=0, largest=False).values[-1]  # nearest other row
    picks = [torch.argmax(nearest)]
    gap = distance[picks[0]].clone().index_fill_(0, picks[0].view(1), -1.0)  # below any distance (1 - cos >= 0)
    for _ in range(count - 1):
        picks.append(torch.argmax(gap))
        gap = torch.minimum(gap, distance[picks[-1]]).index_fill_(0, picks[-1].view(1), -1.0)
    return torch.stack(picks)
