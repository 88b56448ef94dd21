"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR
2025; github.com/dvlab-research/VisionZip).

Before the language model, per image, from the vision tower's feature layer (LLaVA-1.5: the second-to-last):
* dominant tokens: the [CLS] token itself and the patches the [CLS] token attends to most (attention summed
  over heads);
* contextual tokens: the remaining patches are assigned to evenly strided targets among them by cosine
  similarity of their keys (averaged over heads), and each target becomes target + mean of its members
  (vision features, before the projector).
The language model sees [CLS, dominant patches in order, contextual tokens] per image, renumbered (compact),
as in the official code. Budgets (dominant + contextual, [CLS] counted among the dominant): 192 = 162 + 30,
128 = 108 + 20, 64 = 54 + 10. The official code has no debiasing; vtprune offers debiasing of the [CLS]
scores that choose the dominant tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.context import StageContext
from ..debias import Debias
from ..core.press import REFERENCE_LAYERS, REFERENCE_TOKENS, Press, budget_fraction, interpolate_table
from ..core.budgets import split_for_budget
from ..core.selection import pack_rows, visionzip_select
from ..core.stages import Kept, Positions, Stage

#: published split of each budget: (dominant tokens incl. [CLS], contextual tokens), of 576 patches
SPLITS = {192: (162, 30), 128: (108, 20), 64: (54, 10)}


@dataclass
class VisionZip(Press):
    """budget: tokens per image as the papers count them (a count of 576 or a fraction; default 128), split
        into dominant and contextual tokens as published; or dominant / contextual: counts per image
        (dominant includes the [CLS] token when include_cls).
    vision_layer: the vision-tower layer (default -2: LLaVA-1.5's feature layer).
    include_cls: feed the [CLS] token as a dominant token (official).
    positions: "compact" (official) or "original" ([CLS] takes its image's first position, a contextual token
        its target's)."""

    budget: int | float | None = None
    dominant: int | None = None
    contextual: int | None = None
    include_cls: bool = True
    vision_layer: int = -2
    debias: Debias | None = None
    positions: Positions = "compact"

    name: ClassVar[str] = "visionzip"
    checked: ClassVar[bool] = False
    summary: ClassVar[str] = "[CLS]-attention dominant tokens + similarity-merged contextual tokens, per image, before the LLM"
    query: ClassVar[str] = "cls"

    def __post_init__(self) -> None:
        self._check_common()
        if self.budget is not None and (self.dominant is not None or self.contextual is not None):
            raise ValueError("VisionZip: give budget= or dominant=/contextual=, not both")
        if (self.dominant is None) != (self.contextual is None):
            raise ValueError("VisionZip: give both dominant= and contextual= (counts per image)")
        if self.budget is not None:
            budget_fraction(self.budget)
        for name in ("dominant", "contextual"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"VisionZip: {name}={value!r} must be a count >= 0")
        if self.dominant is not None and self.dominant < 1 + int(self.include_cls):
            raise ValueError(f"VisionZip: dominant={self.dominant} keeps no patch (it counts the [CLS] token)")
        if not isinstance(self.include_cls, bool):
            raise TypeError(f"include_cls={self.include_cls!r} must be True or False")

    def split(self, num_patches: int) -> tuple[int, int]:
        """(dominant patches, contextual tokens) for an image of `num_patches` patches ([CLS] not counted)."""
        if self.dominant is not None:
            dominant, contextual = self.dominant, self.contextual
        else:
            shares = split_for_budget(SPLITS, budget_fraction(128 if self.budget is None else self.budget), interpolate_table)
            if shares is None:  # the full count: every patch, nothing added
                return num_patches, 0
            dominant, contextual = (max(1, round(share / REFERENCE_TOKENS * num_patches)) for share in shares)
        patches = max(1, min(num_patches, dominant - int(self.include_cls)))
        return patches, max(0, min(contextual, num_patches - patches - int(self.include_cls)))  # never more than the image

    def stages(self, num_layers: int = REFERENCE_LAYERS) -> list[Stage]:
        patches, _ = self.split(REFERENCE_TOKENS)
        return [Stage(layer=0, keep=patches / REFERENCE_TOKENS, score_layer=None)]

    def vision_layers(self) -> tuple[int, ...]:
        return (self.vision_layer,)

    def score(self, ctx: StageContext) -> torch.Tensor:
        return ctx.vision_attention(self.vision_layer)

    def select(self, ctx: StageContext) -> Kept:
        """Every image of the batch at once (`selection.visionzip_select`, a padded problem per image); the
        counts are host facts, so nothing is read back from the device."""
        scores = ctx.debias(self.score(ctx))  # (B, R); at the language model's input every token is present, in order
        features = ctx.vision_hidden_states(self.vision_layer, output=True)  # (N_img, T, D) pre-projector
        keys = ctx.vision_keys(self.vision_layer).mean(dim=1)  # (N_img, T, d): head-mean keys
        first, device = ctx.adapter.vision_first_patch, ctx.ranks.device
        problems = [(b, segment) for b, segments in enumerate(ctx.segments) for segment in segments]
        splits = [self.split(segment.length) for _, segment in problems]
        max_patches, max_contextual = max(s[0] for s in splits), max(s[1] for s in splits)
        length = max(segment.length for _, segment in problems)
        sample = torch.tensor([b for b, _ in problems], device=device)
        offset = torch.tensor([segment.offset for _, segment in problems], device=device)
        image = torch.tensor([segment.image_index for _, segment in problems], device=device)
        column = torch.arange(length, device=device)
        valid = column < torch.tensor([segment.length for _, segment in problems], device=device)[:, None]
        rank_column = torch.where(valid, offset[:, None] + column, 0)  # (P, L) column of ctx.ranks
        row = sample[:, None]
        padding = share = None
        if ctx.debias_padding and ctx.padding_mask is not None:
            padding = ctx.padding_mask[row, rank_column] & valid
            if ctx.padding_fractions:
                share = ctx.padding_share_batched[row, rank_column]
        patch = (first + column).clamp(max=features.shape[1] - 1)
        dominant, dominant_ok, targets, merged, targets_ok = visionzip_select(
            scores[row, rank_column].float(), valid, keys[image[:, None], patch], features[image[:, None], patch],
            torch.tensor([s[0] for s in splits], device=device), torch.tensor([s[1] for s in splits], device=device),
            max_patches, max(1, max_contextual), padding, share)
        ranks_of = ctx.ranks[row, rank_column]  # (P, L) the rank of each patch
        dominant_ranks = torch.gather(ranks_of, 1, dominant.clamp(max=length - 1))
        counts, starts = self._layout([s[0] for s in splits], [b for b, _ in problems], ctx.num_samples)
        ranks = pack_rows(dominant_ranks, dominant_ok, sample, torch.tensor(starts, device=device),
                          ctx.num_samples, max(counts), fill=-1)
        ranks_counts = None if min(counts) == max(counts) else counts
        cls = int(self.include_cls and not self.keeps_everything)
        if not cls and not max_contextual:
            return Kept(ranks=ranks, counts=ranks_counts)
        # per image: [CLS] (right before its first dominant patch, at its first position), then its contextual
        # tokens (after its last dominant patch, each at its target's position)
        last_dominant = torch.gather(dominant_ranks, 1, (dominant_ok.sum(dim=1, keepdim=True) - 1))
        target_ranks = torch.gather(ranks_of, 1, targets.clamp(max=length - 1))
        contextual = targets_ok if max_contextual else targets_ok[:, :0]
        values, ok = merged[:, : contextual.shape[1]], contextual
        after = last_dominant.expand_as(contextual)
        before = torch.zeros_like(contextual)
        positions = target_ranks[:, : contextual.shape[1]]
        if cls:
            cls_features = features[image, ctx.adapter.vision_cls_index][:, None]  # (P, 1, D)
            values = torch.cat([cls_features, values], dim=1)
            ok = torch.cat([torch.ones_like(ok[:, :1]), ok], dim=1)
            after = torch.cat([dominant_ranks[:, :1], after], dim=1)
            before = torch.cat([torch.ones_like(before[:, :1]), before], dim=1)
            positions = torch.cat([ranks_of[:, :1], positions], dim=1)
        extra_counts, extra_starts = self._layout([cls + s[1] for s in splits], [b for b, _ in problems], ctx.num_samples)
        extra_start, width = torch.tensor(extra_starts, device=device), max(extra_counts)
        pack = lambda x, fill=0: pack_rows(x, ok, sample, extra_start, ctx.num_samples, width, fill)  # noqa: E731
        extra_valid = pack(ok, False)
        return Kept(ranks=ranks, counts=ranks_counts, extra=ctx.adapter.project_visual(pack(values)),
                    extra_after=pack(after), extra_before=pack(before, False), extra_positions=pack(positions),
                    extra_valid=None if min(extra_counts) == width else extra_valid,
                    extra_counts=None if min(extra_counts) == width else extra_counts)

    @staticmethod
    def _layout(counts: list[int], samples: list[int], num_samples: int) -> tuple[list[int], list[int]]:
        """Per sample, the total of its problems' counts, and per problem, where its entries start in its row."""
        totals, starts = [0] * num_samples, []
        for b, count in zip(samples, counts):
            starts.append(totals[b])
            totals[b] += count
        return totals, starts

    def equivalent_tokens(self, num_visual: int = REFERENCE_TOKENS, num_layers: int = REFERENCE_LAYERS) -> float:
        patches, contextual = self.split(num_visual)
        cls = int(self.include_cls and not self.keeps_everything)
        return float(patches + cls + contextual)  # every decoder layer sees the short input

    @property
    def keeps_everything(self) -> bool:
        """Whether the budget is the full count (every patch kept, no [CLS] or merged tokens added)."""
        return self.dominant is None and self.budget is not None and budget_fraction(self.budget) >= 1.0
