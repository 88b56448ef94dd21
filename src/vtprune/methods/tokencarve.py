"""TokenCarve (Tan et al., "TokenCarve: Information-Preserving Visual Token Compression in Multimodal Large
Language Models", arXiv 2503.10501; github.com/ShawnTan86/TokenCarve).

Before decoder layer 2, two rankings of the visual tokens are fused (Borda: a token ranked r-th of V gets
w (V - r) points from one and (1 - w) (V - r) from the other, w = 0.5):
* AV: the last token's attention inside layer 1 (head mean);
* SV: an information-preservation score of layer 1's output: the L1 norm of each visual token's row of U S,
  from the SVD of the visual tokens' hidden states.
The best 1.5 k become candidates; the first half (A) stays, and of the second half (B) the k/2 tokens most
similar to an A token (cosine) are merged into it (plain mean), the others stay: k tokens remain. Kept tokens
keep their positions, and the KV cache of layers 0-1 is trimmed to them (decoding sees only kept tokens), as
in the official code. Debiasing (the paper's patch): AV only, before ranking, counts not lowered;
`debias_target="fused"` debiases the fused score instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..core.context import StageContext
from ..core.press import REFERENCE_LAYERS, Press, layer_list
from ..core.selection import borda, carve_merge, information
from ..core.stages import Kept, Positions, Stage
from ..debias import Debias


@dataclass
class TokenCarve(Press):
    """budget: visual tokens kept, as the papers count them (a count of 576 or a fraction; default 128; the
        published scripts use 64); or keep: a count or a fraction of the image's tokens.
    layer: the decoder layer before which tokens are cut (AV from the layer before, SV from its output).
    av_weight: the AV share of the Borda points (0.5).
    debias_target: "attention" (the paper: AV only) or "fused" (the fused score).
    trim_cache: trim the cache of the layers before the cut to the kept tokens (official).
    positions: "original" (official) or "compact"."""

    budget: int | float | None = None
    keep: int | float | None = None
    layer: int = 2
    av_weight: float = 0.5
    debias_target: Literal["attention", "fused"] = "attention"
    trim_cache: bool = True
    debias: Debias | None = None
    positions: Positions = "original"

    name: ClassVar[str] = "tokencarve"
    checked: ClassVar[bool] = False
    summary: ClassVar[str] = "Borda fusion of last-token attention and an SVD information score; similar tokens merged"
    query: ClassVar[str] = "last"

    def __post_init__(self) -> None:
        self._check_common()
        layer_list(self.layer)
        if self.layer < 1:
            raise ValueError(
                f"TokenCarve: layer={self.layer} is out of range: it uses layer K-1's attention, so K >= 1"
            )
        if not 0.0 <= self.av_weight <= 1.0:
            raise ValueError(f"TokenCarve: av_weight={self.av_weight} must lie in [0, 1]")
        if self.debias_target not in ("attention", "fused"):
            raise ValueError(f"TokenCarve: debias_target={self.debias_target!r}: use 'attention' or 'fused'")
        self._check_schedule()

    def stages(self, num_layers: int = REFERENCE_LAYERS) -> list[Stage]:
        return [
            Stage(layer=self.layer, keep=self._single_keep(), score_layer=self.layer - 1, trim_cache=self.trim_cache)
        ]

    def select(self, ctx: StageContext) -> Kept:
        attention = ctx.attention("last")[:, 0]  # (B, R)
        if self.debias_target == "attention":
            attention = ctx.debias(attention)
        states = ctx.visual_hidden_states(ctx.stage.layer)  # layer K-1's output, (B, R, D)
        full = all(count == ctx.ranks.shape[1] for count in ctx.present_counts)
        valid = None if full else ctx.present  # None: every slot holds a token (a host fact)
        fused = borda(attention.float(), information(states.float(), valid), valid, self.av_weight)
        if self.debias_target == "fused":
            fused = ctx.debias(fused)
        counts = ctx.keep_counts()
        keep = counts[0] if counts == [counts[0]] * len(counts) else torch.tensor(counts, device=ctx.ranks.device)
        indices, kept, values = carve_merge(fused.float(), states.float(), valid, keep, max(counts))
        if min(counts) == max(counts):  # every index is a token
            ranks = torch.gather(ctx.ranks, 1, indices)
        else:
            ranks = torch.where(kept, torch.gather(ctx.ranks, 1, indices.clamp(max=ctx.ranks.shape[1] - 1)), -1)
        return Kept(ranks=ranks, values=values.to(states.dtype), counts=None if min(counts) == max(counts) else counts)

    @staticmethod
    def information(values: torch.Tensor) -> torch.Tensor:
        """(R, D) hidden states -> (R,) L1 norm of each row of U S, where values = U S V^T.

        U S comes from the eigendecomposition of the (R, R) Gram matrix values values^T = U S^2 U^T (in float64),
        not from an SVD of the (R, D) matrix: the same numbers (signs of U's columns vanish in the norm), at a
        fraction of the cost and in a time that does not depend on the data (LAPACK's SVD of a layer-1 hidden
        state took from 0.3 s to over 4 s on CPU)."""
        device = values.device
        if device.type == "mps":  # no float64 on MPS
            values = values.cpu()
        values = values.double()
        eigenvalues, vectors = torch.linalg.eigh(values @ values.T)
        return (vectors * eigenvalues.clamp_min(0).sqrt()).abs().sum(dim=1).float().to(device)

    def _borda(self, attention: torch.Tensor, information: torch.Tensor) -> torch.Tensor:
        """Borda points: the r-th of V by attention gets av_weight (V - r), by information (1 - av_weight) (V - r)."""
        count = len(attention)
        points = torch.arange(count, 0, -1, dtype=torch.float32, device=attention.device)
        fused = torch.zeros(count, device=attention.device)
        fused.index_add_(0, torch.argsort(attention, descending=True, stable=True), points * self.av_weight)
        fused.index_add_(0, torch.argsort(information, descending=True, stable=True), points * (1 - self.av_weight))
        return fused

    @staticmethod
    def _merge(states, ranks, candidates, keep, dtype) -> Kept:
        """A = the first half of the candidates, B = the rest; the (len(candidates) - keep) B tokens most similar
        to an A token are averaged into it (plain mean, the A token included); the others stay."""
        half = len(candidates) // 2
        a, b = candidates[:half], candidates[half:]
        merged_away = min(len(candidates) - keep, half)
        if merged_away <= 0:  # keep >= the candidates (e.g. keep 1: one candidate): nothing to merge
            kept = candidates[:keep]
            order_kept = torch.argsort(ranks[kept])
            return Kept(ranks=ranks[kept][order_kept], values=states[kept][order_kept].to(dtype))
        unit = torch.nn.functional.normalize(states, dim=-1)
        best, target = (unit[b] @ unit[a].T).max(dim=1)  # (|B|,) best A for each B token
        order = torch.argsort(best, descending=True, stable=True)
        merging, staying = order[:merged_away], order[merged_away:]
        totals = states[a].clone().index_add_(0, target[merging], states[b[merging]])
        counts = torch.ones(len(a), device=states.device).index_add_(
            0, target[merging], torch.ones(len(merging), device=states.device)
        )
        kept = torch.cat([a, b[staying]])
        values = torch.cat([totals / counts[:, None], states[b[staying]]])
        order_kept = torch.argsort(ranks[kept])
        return Kept(ranks=ranks[kept][order_kept], values=values[order_kept].to(dtype))
