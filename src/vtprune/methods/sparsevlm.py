"""SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference", ICML 2025; github.com/Gumpest/SparseVLMs, the v1.5 code line that arXiv 2508.17807 patched).

* Raters, chosen once per request from the language model's input: the text tokens after the image whose
  relevance to the visual tokens (softmax over the text of each visual token's dot products with them,
  averaged over the visual tokens) is above the mean.
* At each sparsification layer (2, 6, 15) the layer's own attention, averaged over heads and over the raters,
  scores the visual tokens present; the top-k stay and the tokens are cut from that layer's output, i.e.
  before layers 3, 7, 16 (vtprune's `layer` counts the layer a cut comes before, as for every method).
  (The official code also prunes one token when the table asks for at least as many tokens as are present;
  vtprune keeps them all then, so that keeping everything is a no-op. The published tables never reach it.)
* Recycling: the best 30% of the pruned tokens by raw score (int(0.3 n) + 1) are clustered by density peaks
  (k-nearest-neighbour density, k = the number of clusters, int(n/10) + 1) and each cluster's mean hidden
  state is inserted right after the kept visual tokens. Inserted tokens are visual tokens for later stages.
* Positions are renumbered after every cut (compact), as in the official code.

Keep counts are the official table (top-k sizes over the visual tokens present, recycled ones included):
192: [300, 200, 110], 128: [303, 110, 36], 64: [66, 30, 17]. Debiasing (the paper's patch): the raters'
attention at the first stage only; recycling ranks by the raw scores; keep count not lowered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from ..context import StageContext, rows_where
from ..debias import Debias
from ..press import REFERENCE_LAYERS, REFERENCE_TOKENS, Press
from ..stages import Kept, Positions, Stage, member, resolve_keep

#: published keep table: budget -> top-k size at each stage (of 576)
SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
LAYERS = (3, 7, 16)  # cuts after the sparsification layers 2, 6, 15
RECYCLE_SHARE = 0.3


@dataclass
class SparseVLM(Press):
    """budget: tokens as the papers count them (a count of 576 or a fraction; default 128), mapped to the
        published table; or keep: the top-k size of each stage (counts or fractions; recycled tokens count).
    layer: the layers before which tokens are cut (default [3, 7, 16]: after the sparsification layers
        2, 6, 15, whose attention scores the stage).
    recycle: merge the best pruned tokens back as cluster means (the official default).
    positions: "compact" (official) or "original" (an inserted token takes its cluster centre's position)."""

    budget: int | float | None = None
    keep: Sequence[int | float] | None = None
    layer: Sequence[int] | None = None
    recycle: bool = True
    debias: Debias | None = None
    positions: Positions = "compact"

    name: ClassVar[str] = "sparsevlm"
    checked: ClassVar[bool] = False
    summary: ClassVar[str] = "text raters' attention at layers 2/6/15; pruned tokens recycled as cluster means"
    query: ClassVar[str] = "text_raters"
    debias_defaults: ClassVar[dict] = {"padding_threshold": 0.5, "drop_padding": False}

    def __post_init__(self) -> None:
        self._check_common()
        if not isinstance(self.recycle, bool):
            raise TypeError(f"recycle={self.recycle!r} must be True or False")
        self._check_schedule()

    def stages(self, num_layers: int = REFERENCE_LAYERS) -> list[Stage]:
        layers, keeps = self._layers_and_keeps(num_layers, LAYERS, SCHEDULES)
        for layer in layers:
            if layer < 1:
                raise ValueError(f"SparseVLM: layer={layer} is out of range; it scores with the layer before, so layers must be >= 1")
        return [Stage(layer=layer, keep=keep, score_layer=layer - 1) for layer, keep in zip(layers, keeps)]

    def input_layers(self) -> tuple[int, ...]:
        return (0,)  # the raters are chosen from the language model's input

    # --- scoring -------------------------------------------------------------------------------------------
    def raters(self, ctx: StageContext) -> list[torch.Tensor]:
        """Per sample, (T_b,) slots of the rater tokens (chosen at the first stage, kept in `ctx.state` as
        prompt positions: text is never cut, so they stay findable)."""
        if "raters" not in ctx.state:
            embeds = ctx.hidden_states(0)
            chosen = []
            for b, (visual, text) in enumerate(zip(ctx.tokens("visual"), ctx.tokens("instruction"))):
                relevance = torch.softmax(embeds[b, visual].float() @ embeds[b, text].float().T, dim=1).mean(dim=0)
                above = relevance > relevance.mean()
                above = above | ~above.any()  # all equal (e.g. one text token): every one rates
                chosen.append(torch.where(above, ctx.slot_prompt_position[b, text], -1))
            ctx.state["raters"] = chosen
        mask = torch.stack([member(ctx.slot_prompt_position[b], positions) for b, positions in
                            enumerate(ctx.state["raters"])]) & ctx.slot_valid & (ctx.slot_visual_rank < 0)
        return rows_where(mask)

    def score(self, ctx: StageContext) -> torch.Tensor:
        raters = self.raters(ctx)
        counts = torch.tensor([len(r) for r in raters], device=ctx.ranks.device)
        return ctx.attention(raters).sum(dim=1) / counts[:, None]  # (B, R): mean over each sample's raters

    def select(self, ctx: StageContext) -> list[Kept]:
        raw = ctx.unpad(self.score(ctx))
        ranked = ctx.debias(raw)
        hidden = ctx.hidden_states(ctx.stage.layer) if self.recycle else None  # the scoring layer's output
        decisions = []
        for b, (ranks, kept) in enumerate(zip(ctx.visual_ranks, ctx.top_k(ranked))):  # the shared rule
            count = ctx.keep_count(b)
            num_pruned = len(ranks) - count
            if not self.recycle or num_pruned == 0:
                decisions.append(Kept(ranks=kept))
                continue
            # the best pruned tokens by raw score (pruned tokens sort first, best first; no host sync)
            pruned = ~member(ranks, kept)
            order = torch.argsort(torch.where(pruned, raw[b].double(), float("-inf")), descending=True, stable=True)
            candidates = order[: min(num_pruned, int(num_pruned * RECYCLE_SHARE) + 1)]
            features = hidden[b, ctx.visual_slots[b][candidates]]
            centres, assignment = density_peak_clusters(features.float(), len(candidates) // 10 + 1)
            members = torch.zeros(len(candidates), len(centres), device=features.device)
            members.scatter_(1, assignment[:, None], 1.0)  # (n, m) one-hot
            merged = (members.T @ features.float()) / members.sum(dim=0)[:, None]
            decisions.append(Kept(ranks=kept, extra=merged.to(features.dtype),
                                  extra_positions=ranks[candidates[centres]]))
        return decisions

    def equivalent_tokens(self, num_visual: int = REFERENCE_TOKENS, num_layers: int = REFERENCE_LAYERS) -> float:
        """As `Press.equivalent_tokens`, counting the recycled tokens each stage inserts."""
        present, total, previous = num_visual, 0.0, 0
        for stage in self.stages(num_layers):
            total += present * (stage.layer - previous)
            previous = stage.layer
            count = resolve_keep(stage.keep, num_visual, present, warn=False)
            pruned = present - count
            clusters = (int(pruned * RECYCLE_SHARE) + 1) // 10 + 1 if self.recycle and pruned else 0
            present = count + clusters
        return (total + present * (num_layers - previous)) / num_layers


def density_peak_clusters(features: torch.Tensor, num_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering of `features` (n, C), as SparseVLM's recycling does it.

    Distances are Euclidean / sqrt(C); a token's density is exp(-mean squared distance to its k nearest
    neighbours, itself included, k = num_clusters); delta is the distance to the nearest denser token (the
    largest distance for the densest); centres are the top `num_clusters` by delta * density (ties: lower
    index). Returns centres (m,) indices in that order and each token's cluster (n,) in 0..m-1 (nearest centre;
    a centre belongs to its own cluster)."""
    count, width = features.shape
    num_clusters = min(num_clusters, count)
    distance = torch.cdist(features[None], features[None])[0] / math.sqrt(width)
    nearest = torch.topk(distance, num_clusters, dim=1, largest=False).values
    density = torch.exp(-(nearest**2).mean(dim=1))
    denser = density[None, :] > density[:, None]  # denser[i, j]: j is denser than i
    delta = torch.where(denser, distance, float("inf")).min(dim=1).values
    delta = torch.where(torch.isinf(delta), distance.max(), delta)
    centres = torch.argsort(delta * density, descending=True, stable=True)[:num_clusters]
    assignment = distance[:, centres].argmin(dim=1)
    assignment[centres] = torch.arange(num_clusters, device=features.device)
    return centres, assignment
