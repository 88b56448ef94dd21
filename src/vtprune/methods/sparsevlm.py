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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.context import StageContext
from ..core.press import REFERENCE_LAYERS, REFERENCE_TOKENS, Press
from ..core.selection import merge_candidates, recycle_counts, recycle_sizes
from ..core.stages import Kept, Positions, Stage, resolve_keep
from ..debias import Debias

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
    text_counts: ClassVar[tuple[str, ...]] = ("instruction",)  # its raters, read with the prompt
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
                raise ValueError(
                    f"SparseVLM: layer={layer} is out of range; it scores with the layer before, so layers must be >= 1"
                )
        return [Stage(layer=layer, keep=keep, score_layer=layer - 1) for layer, keep in zip(layers, keeps)]

    def input_layers(self) -> tuple[int, ...]:
        return (0,)  # the raters are chosen from the language model's input

    # --- scoring -------------------------------------------------------------------------------------------
    def _choose_raters(self, ctx: StageContext) -> None:
        """Choose the raters at the first stage and keep in `ctx.state`: their slots now (B, T) (raters first, in
        sequence order; the other entries repeat the first rater) with the sequence length, weights (B, T, 1) float
        (1 for a rater) and counts (B, 1) float (T: the instruction tokens of the longest)."""
        embeds = ctx.hidden_states(0).float()
        visual = ctx.slots
        text, text_ok = ctx.query_slots("instruction")  # text_ok None: every entry real
        width = embeds.shape[-1]
        visual_embeds = torch.gather(embeds, 1, visual[:, :, None].expand(-1, -1, width))
        text_embeds = torch.gather(embeds, 1, text[:, :, None].expand(-1, -1, width))
        logits = torch.bmm(visual_embeds, text_embeds.transpose(1, 2))  # (B, V, T)
        if text_ok is not None:
            logits = logits.masked_fill(~text_ok[:, None, :], float("-inf"))
        if ctx.all_present:
            relevance = torch.softmax(logits, dim=2).sum(dim=1) / visual.shape[1]  # (B, T) mean over the visual
        else:
            relevance = (torch.softmax(logits, dim=2) * ctx.present[:, :, None]).sum(dim=1) / ctx.present.sum(
                dim=1, keepdim=True
            )
        if text_ok is None:
            above = relevance > relevance.sum(dim=1, keepdim=True) / text.shape[1]
            above = above | ~above.any(dim=1, keepdim=True)  # all equal (e.g. one text token): every one rates
        else:
            mean = (relevance * text_ok).sum(dim=1, keepdim=True) / text_ok.sum(dim=1, keepdim=True)
            above = (relevance > mean) & text_ok
            above = above | (text_ok & ~above.any(dim=1, keepdim=True))
        first = torch.argsort(above, dim=1, descending=True, stable=True)  # the raters first, in sequence order
        rates = torch.gather(above, 1, first)
        slots = torch.gather(text, 1, first)
        ctx.state["rater_slots"] = (torch.where(rates, slots, slots[:, :1]), ctx.slot_valid.shape[1])
        ctx.state["rater_weights"] = rates[:, :, None].float()
        ctx.state["rater_counts"] = ctx.state["rater_weights"].sum(dim=1)
        ctx.state["rater_tail"] = ctx.unpadded  # every row all real tokens: the instruction is its tail
        ctx.state["rater_prompt"] = ctx.slot_prompt_position  # to find them again by prompt position

    def raters(self, ctx: StageContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) slots of the rater tokens now and (B, T, 1) float weights (1 for a real rater, 0 for an entry
        that repeats the first rater's slot), chosen at the first stage (`_choose_raters`). Text is never cut:
        when every row is all real tokens, the instruction is each row's tail and its slots move with the length;
        else they are found again by prompt position."""
        if "rater_slots" not in ctx.state:  # the first stage
            self._choose_raters(ctx)
            return ctx.state["rater_slots"][0], ctx.state["rater_weights"]
        slots, length = ctx.state["rater_slots"]
        weights = ctx.state["rater_weights"]
        if ctx.state["rater_tail"] and ctx.unpadded:
            return slots + (ctx.slot_valid.shape[1] - length), weights
        if "raters" not in ctx.state:  # (B, T) their prompt positions, -1 past a sample's raters
            prompt = torch.gather(ctx.state["rater_prompt"], 1, slots)
            ctx.state["raters"] = torch.where(weights[:, :, 0] > 0, prompt, -1)
        raters = ctx.state["raters"]
        mask = (
            (ctx.slot_prompt_position[:, :, None] == raters[:, None, :]).any(dim=2)
            & ctx.slot_valid
            & (ctx.slot_visual_rank < 0)
        )  # (B, N)
        slots = torch.argsort(mask, dim=1, descending=True, stable=True)[:, : raters.shape[1]]  # the raters first
        return torch.where(weights[:, :, 0] > 0, slots, slots[:, :1]), weights

    def score(self, ctx: StageContext) -> torch.Tensor:
        slots, weights = self.raters(ctx)
        return (ctx.attention(slots) * weights).sum(dim=1) / ctx.state["rater_counts"]  # (B, R): mean over raters

    def select(self, ctx: StageContext) -> Kept:
        raw = self.score(ctx)
        kept = ctx.top_k(ctx.debias(raw))  # the shared rule
        counts = ctx.counts_of(kept)
        pruned_counts = [present - count for present, count in zip(ctx.present_counts, counts)]
        n, m = recycle_sizes(max(pruned_counts))
        if not self.recycle or m == 0:
            return Kept(ranks=kept, counts=None if min(counts) == max(counts) else counts)
        # the best pruned tokens by raw score, clustered; the scoring layer's output hidden states
        columns, real = ctx.columns_of(kept)
        if real is None:  # every kept entry a token: the pruned ones are the others present
            pruned_scores = raw.scatter(1, columns, float("-inf"))
            if not ctx.all_present:
                pruned_scores = pruned_scores.masked_fill(~ctx.present, float("-inf"))
        else:
            pruned = ctx.present & ~(ctx.ranks[:, :, None] == kept[:, None, :]).any(dim=2)
            pruned_scores = raw.masked_fill(~pruned, float("-inf"))
        order = torch.argsort(pruned_scores, dim=1, descending=True, stable=True)[:, :n]  # (B, n) best first
        rows = ctx.batch_rows()
        values = ctx.hidden_states(ctx.stage.layer)[rows, torch.gather(ctx.slots, 1, order)]  # (B, n, D)
        candidates, clusters = recycle_counts(pruned_counts, raw.device)
        centres, merged, clustered = merge_candidates(values.float(), candidates, clusters, n, m, rows)
        return Kept(
            ranks=kept,
            counts=None if min(counts) == max(counts) else counts,
            extra=merged.to(values.dtype),
            extra_positions=torch.gather(ctx.ranks, 1, torch.gather(order, 1, centres)),
            extra_valid=clustered,
            extra_counts=None if clustered is None else [recycle_sizes(count)[1] for count in pruned_counts],
        )

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
