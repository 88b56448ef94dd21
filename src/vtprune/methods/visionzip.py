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

from ..context import StageContext
from ..debias import Debias
from ..press import REFERENCE_LAYERS, REFERENCE_TOKENS, Press, budget_fraction, interpolate_table
from ..budgets import split_for_budget
from ..stages import Kept, Positions, Stage, rank_order

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

    def select(self, ctx: StageContext) -> list[Kept]:
        ranked = ctx.unpad(ctx.debias(self.score(ctx)))
        features = ctx.vision_hidden_states(self.vision_layer, output=True)  # (N_img, T, D) pre-projector
        keys = ctx.vision_keys(self.vision_layer).mean(dim=1)  # (N_img, T, d): head-mean keys
        first = ctx.adapter.vision_first_patch
        decisions = []
        for b, segments in enumerate(ctx.segments):
            ranks, padding = ctx.visual_ranks[b], (ctx.padding[b] if ctx.debias_padding else None)
            kept_parts, extra, after, before, positions = [], [], [], [], []
            for segment in segments:  # at the language model's input every token is present, in order
                span = slice(segment.offset, segment.offset + segment.length)
                patches, contextual = self.split(segment.length)
                share = ctx.padding_share_or_none(b)
                order = rank_order(ranked[b][span], None if padding is None else padding[span],
                                   None if share is None else share[span])
                dominant = torch.sort(order[:patches]).values  # patch indices in the image
                kept_parts.append(ranks[span][dominant])
                image = features[segment.image_index]
                if self.include_cls and not self.keeps_everything:  # the [CLS] feature, projected, ahead of the patches
                    extra.append(ctx.adapter.project_visual(image[ctx.adapter.vision_cls_index]))
                    after.append(ranks[span][dominant[0]]), before.append(True), positions.append(ranks[span][0])
                if contextual:
                    rest = torch.ones(segment.length, dtype=torch.bool, device=ranks.device).index_fill_(0, dominant, False)
                    candidates = torch.sort(torch.where(rest, torch.arange(segment.length, device=ranks.device),
                                                        segment.length)).values[: segment.length - patches]
                    step = max(1, len(candidates) // contextual)
                    targets = candidates[torch.arange(0, len(candidates), step, device=ranks.device)[:contextual]]
                    unit = torch.nn.functional.normalize(keys[segment.image_index, first + candidates].float(), dim=-1)
                    target_unit = torch.nn.functional.normalize(keys[segment.image_index, first + targets].float(), dim=-1)
                    assignment = (unit @ target_unit.T).argmax(dim=1)  # (R,) nearest target of each candidate
                    is_target = (candidates[:, None] == targets[None, :]).any(dim=1)
                    members = torch.zeros(len(candidates), len(targets), device=ranks.device)
                    members.scatter_(1, assignment[:, None], 1.0)
                    members = members * (~is_target)[:, None].float()  # targets are not their own members
                    values = image[first + candidates].float()
                    merged = image[first + targets].float() + (members.T @ values) / members.sum(dim=0).clamp(min=1)[:, None]
                    extra.extend(ctx.adapter.project_visual(merged.to(image.dtype)).unbind(0))
                    last = ranks[span][dominant[-1]]
                    after.extend([last] * len(targets)), before.extend([False] * len(targets))
                    positions.extend(ranks[span][targets].unbind(0))
            kept = torch.cat(kept_parts)
            if not extra:
                decisions.append(Kept(ranks=kept))
                continue
            decisions.append(Kept(ranks=kept, extra=torch.stack(extra), extra_after=torch.stack(after),
                                  extra_before=torch.tensor(before, device=kept.device),
                                  extra_positions=torch.stack(positions)))
        return decisions

    def equivalent_tokens(self, num_visual: int = REFERENCE_TOKENS, num_layers: int = REFERENCE_LAYERS) -> float:
        patches, contextual = self.split(num_visual)
        cls = int(self.include_cls and not self.keeps_everything)
        return float(patches + cls + contextual)  # every decoder layer sees the short input

    @property
    def keeps_everything(self) -> bool:
        """Whether the budget is the full count (every patch kept, no [CLS] or merged tokens added)."""
        return self.dominant is None and self.budget is not None and budget_fraction(self.budget) >= 1.0
