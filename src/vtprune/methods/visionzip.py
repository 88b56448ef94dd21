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

from ..core.budgets import split_for_budget
from ..core.context import StageContext
from ..core.press import REFERENCE_LAYERS, REFERENCE_TOKENS, Press, budget_fraction, interpolate_table
from ..core.selection import pack_rows, visionzip_select
from ..core.stages import Kept, Positions, Stage
from ..debias import Debias

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
    summary: ClassVar[str] = (
        "[CLS]-attention dominant tokens + similarity-merged contextual tokens, per image, before the LLM"
    )
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
            shares = split_for_budget(
                SPLITS, budget_fraction(128 if self.budget is None else self.budget), interpolate_table
            )
            if shares is None:  # the full count: every patch, nothing added
                return num_patches, 0
            dominant, contextual = (max(1, round(share / REFERENCE_TOKENS * num_patches)) for share in shares)
        patches = max(1, min(num_patches, dominant - int(self.include_cls)))
        return patches, max(
            0, min(contextual, num_patches - patches - int(self.include_cls))
        )  # never more than the image

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
        samples = [b for b, _ in problems]
        splits = [self.split(segment.length) for _, segment in problems]
        patches, contextual = [s[0] for s in splits], [s[1] for s in splits]
        lengths = [segment.length for _, segment in problems]
        length = max(lengths)
        same = lengths == [length] * len(problems)
        if (
            samples == list(range(ctx.num_samples))
            and same
            and all(s.offset == 0 for _, s in problems)
            and length == ctx.ranks.shape[1]
        ):
            by_rank = lambda x: x  # noqa: E731  one image per sample, filling its row: nothing to gather
        else:
            offset = torch.tensor(
                [[s.offset + min(c, s.length - 1) for c in range(length)] for _, s in problems], device=device
            )  # (P, L) column of ctx.ranks (the last one past the image)
            row = torch.tensor(samples, device=device)[:, None]
            by_rank = lambda x: x[row, offset]  # noqa: E731
        images = [segment.image_index for _, segment in problems]
        if images == list(range(features.shape[0])) and same and first + length == features.shape[1]:
            by_patch = lambda x: x[:, first:]  # noqa: E731
        else:
            image = torch.tensor(images, device=device)[:, None]
            patch = (first + torch.arange(length, device=device)).clamp(max=features.shape[1] - 1)
            by_patch = lambda x: x[image, patch]  # noqa: E731
        valid = None if same else torch.arange(length, device=device) < torch.tensor(lengths, device=device)[:, None]
        padding = share = None
        if ctx.debias_padding and ctx.padding_mask is not None:
            padding = by_rank(ctx.padding_mask) if valid is None else by_rank(ctx.padding_mask) & valid
            if ctx.padding_fractions:
                share = by_rank(ctx.padding_share_batched)

        def uniform(counts):  # one count for every row: an int (a host fact); else a tensor
            return counts[0] if counts == [counts[0]] * len(counts) else torch.tensor(counts, device=device)

        dominant, _, targets, merged, _ = visionzip_select(
            by_rank(scores).float(),
            valid,
            by_patch(keys),
            by_patch(features),
            uniform(patches),
            uniform(contextual),
            max(patches),
            max(1, max(contextual)),
            padding,
            share,
        )
        ranks_of = by_rank(ctx.ranks)  # (P, L) the rank of each patch
        dominant_ranks = torch.gather(ranks_of, 1, dominant.clamp(max=length - 1))
        (ranks,), counts = pack_rows([(dominant_ranks, -1)], patches, samples, ctx.num_samples)
        ranks_counts = None if min(counts) == max(counts) else counts
        cls = int(self.include_cls and not self.keeps_everything)
        width = max(contextual)
        if not cls and not width:
            return Kept(ranks=ranks, counts=ranks_counts)
        # per image: [CLS] (right before its first dominant patch, at its first position), then its contextual
        # tokens (after its last dominant patch, each at its target's position)
        values = merged[:, :width]
        if cls:
            cls_index = ctx.adapter.vision_cls_index
            cls_features = (
                features[:, cls_index : cls_index + 1]
                if images == list(range(features.shape[0]))
                else features[images, cls_index][:, None]
            )  # (P, 1, D)
            values = torch.cat([cls_features, values], dim=1)
        last = [[0] * cls + [count - 1] * width for count in patches]  # columns of dominant_ranks
        after = torch.gather(dominant_ranks, 1, torch.tensor(last, device=device))
        before = torch.tensor([[True] * cls + [False] * width] * len(problems), device=device)
        positions = torch.gather(
            ranks_of, 1, torch.nn.functional.pad(targets[:, :width].clamp(max=length - 1), (cls, 0))
        )
        valid = torch.ones_like(before)
        (values, after, before, positions, valid), extra_counts = pack_rows(
            [(values, 0), (after, 0), (before, False), (positions, 0), (valid, False)],
            [cls + count for count in contextual],
            samples,
            ctx.num_samples,
        )
        ragged = min(extra_counts) < max(extra_counts)
        return Kept(
            ranks=ranks,
            counts=ranks_counts,
            extra=ctx.adapter.project_visual(values),
            extra_after=after,
            extra_before=before,
            extra_positions=positions,
            extra_valid=valid if ragged else None,
            extra_counts=extra_counts if ragged else None,
        )

    def equivalent_tokens(self, num_visual: int = REFERENCE_TOKENS, num_layers: int = REFERENCE_LAYERS) -> float:
        patches, contextual = self.split(num_visual)
        cls = int(self.include_cls and not self.keeps_everything)
        return float(patches + cls + contextual)  # every decoder layer sees the short input

    @property
    def keeps_everything(self) -> bool:
        """Whether the budget is the full count (every patch kept, no [CLS] or merged tokens added)."""
        return self.dominant is None and self.budget is not None and budget_fraction(self.budget) >= 1.0
