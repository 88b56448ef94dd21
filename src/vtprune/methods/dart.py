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

from ..context import StageContext
from ..press import REFERENCE_LAYERS, Press, budget_fraction, layer_list
from ..stages import Positions, Stage


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
    summary: ClassVar[str] = "pivots by key norm (layer K-1); keep the tokens least similar to each pivot (no attention)"

    def __post_init__(self) -> None:
        self._check_common()
        if self.per_pivot is not None and self.budget is not None:
            raise ValueError("DART: give budget= or per_pivot=, not both")
        if self.budget is not None:
            budget_fraction(self.budget)
        for name in ("per_pivot", "pivot_image", "pivot_text"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < (1 if name != "per_pivot" else 0)):
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

    def select(self, ctx: StageContext) -> list[torch.Tensor]:
        keys = ctx.keys()  # (B, Hkv, N, d) layer K-1, with RoPE
        norms = keys.float().abs().sum(dim=(1, 3))  # (B, N): the L1 norm over all heads (shared kv heads count once)
        states = ctx.adapter.final_norm(ctx.hidden_states(ctx.stage.layer)).float()  # layer K-1's output, normed
        kept = []
        for b, ranks in enumerate(ctx.visual_ranks):
            visual, text = ctx.visual_slots[b], ctx.tokens("instruction")[b]
            image_pivots = visual[torch.topk(norms[b, visual], min(self.pivot_image, len(visual))).indices]
            text_pivots = text[torch.topk(norms[b, text], min(self.pivot_text, len(text))).indices]
            pivots = torch.cat([image_pivots, text_pivots])
            if self.pivot_order == "official":  # the order of a Python set of absolute (prompt) positions
                prompt = ctx.slot_prompt_position[b, pivots].tolist()
                order = [prompt.index(p) for p in set(prompt)]
                pivots = pivots[torch.tensor(order, device=pivots.device)]
            unit = torch.nn.functional.normalize(states[b], dim=-1)
            is_pivot = (visual[:, None] == image_pivots[None, :]).any(dim=1)
            available = ~is_pivot  # (R,) over the visual tokens present
            claims = min(self.claims(ctx.num_visual[b]), len(visual))
            chosen = is_pivot.clone()
            for pivot in pivots:
                similarity = unit[visual] @ unit[pivot]  # (R,)
                key = torch.where(available, -similarity, float("-inf"))
                picked = torch.argsort(key, descending=True, stable=True)[:claims]
                claimed = torch.zeros_like(chosen).scatter_(0, picked, key[picked] > float("-inf"))  # none if exhausted
                chosen |= claimed
                available &= ~claimed
            kept.append(ranks[chosen])
        return kept

    def equivalent_tokens(self, num_visual: int = 576, num_layers: int = REFERENCE_LAYERS) -> float:
        kept = min(num_visual, self.pivot_image + (self.pivot_image + self.pivot_text) * self.claims(num_visual))
        return (num_visual * self.layer + kept * (num_layers - self.layer)) / num_layers
