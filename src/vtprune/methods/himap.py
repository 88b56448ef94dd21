"""HiMAP (Yin et al., "Lifting the Veil on Visual Information Flow in MLLMs: Unlocking Pathways to Faster
Inference", CVPR 2025; github.com/ustc-hyin/HiMAP).

Two stages. Shallow (before layer 2): the visual tokens that the text after the image (the instruction, up
to the last token) attends to most inside layer 1, attention averaged over heads and summed over those text
tokens. Deep (before layer 8): the visual tokens that receive the most attention from the other visual tokens
inside layer 7 (averaged over heads, summed over the visual queries). Kept tokens keep their positions.

Defaults are the debiasing paper's runs (arXiv 2508.17807, scripts/HiMAP): 115 tokens kept before layer 2 and
90 before layer 8 (of 576; 125 tokens averaged over 32 layers, its "128" budget). Its debiasing: the shallow
stage only, padding threshold 0.5, keep count not lowered. The official code recomputes the whole pruned
forward for every generated token (no KV cache, the shallow selection re-ranked with the generated tokens as
extra queries); vtprune selects once at prefill and decodes from the cache (identical for the first token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.context import StageContext
from ..core.press import REFERENCE_LAYERS, Press, layer_list
from ..core.stages import Positions, Stage
from ..debias import Debias

#: published schedule (debias runs): budget -> visual tokens present after each stage (of 576)
SCHEDULES = {128: (115, 90)}
LAYERS = (2, 8)


@dataclass
class HiMAP(Press):
    """budget: tokens as the papers count them (a count of 576 or a fraction; default 128), or keep: visual
        tokens present after the shallow and the deep stage (counts or fractions).
    layer: [shallow, deep] layers before which tokens are cut (default [2, 8]; each stage scores with the
        attention inside the layer before it).
    positions: "original" (official) or "compact"."""

    budget: int | float | None = None
    keep: Sequence[int | float] | None = None
    layer: Sequence[int] | None = None
    debias: Debias | None = None
    positions: Positions = "original"

    name: ClassVar[str] = "himap"
    checked: ClassVar[bool] = False
    text_counts: ClassVar[tuple[str, ...]] = ("instruction",)  # its queries, read with the prompt
    summary: ClassVar[str] = "shallow: instruction-to-image attention (summed); deep: image-to-image attention"
    query: ClassVar[str] = "text_after_image"
    debias_defaults: ClassVar[dict] = {"padding_threshold": 0.5, "drop_padding": False}

    def __post_init__(self) -> None:
        self._check_common()
        if self.layer is not None and len(layer_list(self.layer)) != 2:
            raise ValueError(f"HiMAP: layer= takes the two stage layers [shallow, deep], got {self.layer!r}")
        if isinstance(self.keep, (list, tuple)) and len(self.keep) != 2:
            raise ValueError(f"HiMAP: keep= takes two counts [shallow, deep], got {self.keep!r}")
        self._check_schedule()

    def stages(self, num_layers: int = REFERENCE_LAYERS) -> list[Stage]:
        layers, keeps = self._layers_and_keeps(num_layers, LAYERS, SCHEDULES)
        for layer in layers:
            if layer < 1:
                raise ValueError(
                    f"HiMAP: layer={layer} is out of range; it scores with the layer before, so layers must be >= 1"
                )
        return [Stage(layer=layer, keep=keep, score_layer=layer - 1) for layer, keep in zip(layers, keeps)]

    def score(self, ctx: StageContext) -> torch.Tensor:
        if ctx.stage_index == 0:  # the instruction's attention to each visual token, summed over its tokens
            return ctx.attention("instruction").sum(dim=1)  # (B, R)
        # attention each visual token receives from the visual tokens (causal: from itself and later ones)
        return ctx.attention("visual").sum(dim=1)
