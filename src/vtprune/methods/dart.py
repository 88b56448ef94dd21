"""DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
More", 2025; github.com/ZichenWen1/DART).

Before decoder layer K (default 2), without attention weights: pivots are the 4 visual tokens and the 4 text
tokens after the image with the largest L1 norm of their keys in layer K-1 (after RoPE, all heads); each
pivot in turn claims the `budget // 8` remaining visual tokens least similar to it (cosine similarity of
layer K-1's output through the model's final norm); the visual pivots and every claimed token stay. Kept
tokens keep their positions. As published, a budget of 128 keeps 4 + 8 x 16 = 132 tokens.

Pivot order: the official loop visits the pivots in the iteration order of a Python set of their absolute
sequence positions (an implementation detail that changes which tokens are kept); `pivot_order="official"`
reproduces it from each sample's prompt positions, "ranked" visits visual then text pivots by key norm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from ..core.context import StageContext
from ..core.press import REFERENCE_LAYERS, Press, budget_fraction, layer_list
from ..core.selection import dart_select
from ..core.stages import Kept, Positions, Stage


@dataclass
class DART(Press):
    """budget: the published budget (a count of 576 or a fraction; default 128): each of the 8 pivots claims
        budget // 8 tokens of the image's share; or per_pivot: claims per pivot directly.
    layer: the decoder layer before which tokens are cut (keys and similarities from the layer before).
    pivot_image / pivot_text: visual and text pivots (4 / 4).
    positions: "original" (official) or "compact"."""

    budget: int | float | None = None
    per_pivot: int | None = None
    layer: int = 2
    pivot_image: int = 4
    pivot_text: int = 4
    pivot_order: Literal["official", "ranked"] = "official"
    positions: Positions = "original"
    debias: None = field(default=None, init=False)

    name: ClassVar[str] = "dart"
    checked: ClassVar[bool] = False
    text_counts: ClassVar[tuple[str, ...]] = ("instruction",)  # read with the prompt (`select`)
    summary: ClassVar[str] = (
        "pivots by key norm (layer K-1); keep the tokens least similar to each pivot (no attention)"
    )

    def __post_init__(self) -> None:
        self._check_common()
        if self.per_pivot is not None and self.budget is not None:
            raise ValueError("DART: give budget= or per_pivot=, not both")
        if self.budget is not None:
            budget_fraction(self.budget)
        for name in ("per_pivot", "pivot_image", "pivot_text"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < (1 if name != "per_pivot" else 0)
            ):
                raise ValueError(f"DART: {name}={value!r} must be a positive int")
        if self.pivot_order not in ("official", "ranked"):
            raise ValueError(f"DART: pivot_order={self.pivot_order!r}: use 'official' or 'ranked'")
        layer_list(self.layer)
        if self.layer < 1:
            raise ValueError(f"DART: layer={self.layer} is out of range: it uses layer K-1's keys, so K >= 1")

    def stages(self, num_layers: int = REFERENCE_LAYERS) -> list[Stage]:
        keep = budget_fraction(128 if self.budget is None else self.budget) if self.per_pivot is None else 1.0
        return [Stage(layer=self.layer, keep=keep, score_layer=self.layer - 1)]

    def claims(self, num_visual: int) -> int:
        """Tokens each pivot claims for a sample with `num_visual` visual tokens."""
        if self.per_pivot is not None:
            return self.per_pivot
        budget = round(budget_fraction(128 if self.budget is None else self.budget) * num_visual)
        return budget // (self.pivot_image + self.pivot_text)

    def select(self, ctx: StageContext) -> Kept:
        """Every sample at once (`selection.dart_select`); how many tokens each keeps is a host fact (the
        pivots, then every pivot's claims until the tokens run out; the text pivots' count from the instruction's
        length, which comes with the layout's one read where the family's adapter carries it and nothing is
        padded), so nothing more is read back at a fixed budget."""
        keys = ctx.keys()  # (B, Hkv, N, d) layer K-1, with RoPE
        norms = keys.float().abs().sum(dim=(1, 3))  # (B, N): the L1 norm over all heads (shared kv heads count once)
        units = torch.nn.functional.normalize(
            ctx.adapter.final_norm(ctx.hidden_states(ctx.stage.layer)).float(), dim=-1
        )
        text, text_ok = ctx.query_slots("instruction")  # text_ok None: every row has as many
        text_counts = ctx.text_counts("instruction")  # host, counted once per request
        present = ctx.present_counts
        visual_ok = None if all(count == ctx.ranks.shape[1] for count in present) else ctx.present  # host facts
        claims = [min(self.claims(visual), count) for visual, count in zip(ctx.num_visual, present)]
        kept = dart_select(
            units,
            norms,
            ctx.slot_prompt_position,
            ctx.slots,
            visual_ok,
            text,
            text_ok,
            claims[0] if claims == [claims[0]] * len(claims) else torch.tensor(claims, device=ctx.ranks.device),
            self.pivot_image,
            self.pivot_text,
            self.pivot_order,
        )  # (B, R) bool
        counts = []
        for count, texts, claim in zip(present, text_counts, claims):
            image_pivots = min(self.pivot_image, count)
            counts.append(min(count, image_pivots + (image_pivots + min(self.pivot_text, texts)) * claim))
        indices = torch.argsort(kept, dim=1, descending=True, stable=True)[:, : max(counts)]  # kept first, ascending
        ranks = torch.gather(ctx.ranks, 1, indices)
        if min(counts) < max(counts):
            ranks = torch.where(torch.gather(kept, 1, indices), ranks, -1)
        return Kept(ranks=ranks, counts=None if min(counts) == max(counts) else counts)

    def equivalent_tokens(self, num_visual: int = 576, num_layers: int = REFERENCE_LAYERS) -> float:
        kept = min(num_visual, self.pivot_image + (self.pivot_image + self.pivot_text) * self.claims(num_visual))
        return (num_visual * self.layer + kept * (num_layers - self.layer)) / num_layers
