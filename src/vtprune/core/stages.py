"""What a pruning method declares and decides, as plain data: stages, per-sample decisions, and the record of
what each stage did. No model code lives here; the engine (`vtprune.core.engine`) acts on these.

Index spaces used throughout:

* visual rank: the index of a visual token among its sample's visual tokens in prompt order (0..V_b-1, images
  one after another). Methods decide in ranks; records report ranks.
* slot: a position in the sequence as it is now, after earlier cuts (what `StageContext` queries and keys use).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ..adapters.base import VisualSegment

Positions = Literal["original", "compact"]


@dataclass(frozen=True)
class Stage:
    """One pruning stage.

    layer: the visual tokens not kept are removed before this decoder layer runs; 0 prunes at the language
        model's input (the embeddings), before any decoder layer.
    keep: how many visual tokens remain after the stage: an int count, or a float in (0, 1] taken as a
        fraction of the sample's visual tokens (rounded, at least 1).
    score_layer: the decoder layer whose *input* the method's attention is computed from (FastV: layer - 1,
        i.e. the attention inside the previous layer; PyramidDrop: layer itself, with that layer's weights);
        None when the method needs no attention (Random, diversity-based methods).
    trim_cache: after the prefill, also remove the tokens this stage removed from the KV cache of the layers
        before it, so that decoding sees only kept tokens in every layer (TokenCarve's official behaviour);
        first stage only, without inserted tokens.
    positions: "original" or "compact" for this stage's cut; None: the press's `positions`.
    """

    layer: int
    keep: int | float
    score_layer: int | None
    trim_cache: bool = False
    positions: Positions | None = None


@dataclass(frozen=True)
class VisionStage:
    """A stage inside the vision tower: after vision layer `layer`'s attention, `merge` tokens of each image
    (a count, or a fraction of the patches present) leave the vision tower's sequence; later vision layers run
    on fewer tokens, and the language model's input loses the same tokens (a stage at layer 0 of the press
    keeps `StageContext.vision_survivors`)."""

    layer: int
    merge: int | float


@dataclass
class Kept:
    """A stage's decision for the whole batch.

    ranks: (B, K) long: per sample (row), the sorted visual ranks that stay in the sequence; a sample that keeps
        fewer than K ends its row with -1 entries (and `counts` says how many it keeps).
    values: (B, K, D) hidden states written into those tokens (merging pruned tokens into kept ones), or None.
    extra: (B, M, D) tokens inserted into the sequence (e.g. SparseVLM's recycled clusters), or None. Inserted
        tokens count as visual tokens at later stages, with new ranks V_b, V_b + 1, ... in insertion order.
    extra_valid: (B, M) bool, which inserted tokens exist (a sample inserting fewer than M); None: all.
    extra_after: (B, M) kept rank each inserted token follows in the sequence (several after one rank keep their
        order); default: the last kept rank.
    extra_before: (B, M) bool, True where the token goes right *before* its `extra_after` rank instead (e.g.
        VisionZip's [CLS] token ahead of the image's patches); default: all after.
    extra_positions: (B, M) rank whose position (RoPE, and the positional trend) each inserted token takes when
        positions are "original"; default: `extra_after`. With "compact" positions tokens are renumbered in
        sequence order.
    counts: per sample, how many entries of its `ranks` row are tokens (host ints), when some rows end in -1;
        None: every entry is a token.
    extra_counts: per sample, how many of the M inserted tokens exist (host ints), when `extra_valid` is given;
        None there: the engine counts them (one synchronisation).

    A method may also return one `Kept` per sample (a list), with 1-D `ranks` (k,) and (k, D) / (m, D) / (m,)
    for the others; the engine pads them into this form.
    """

    ranks: torch.Tensor
    values: torch.Tensor | None = None
    extra: torch.Tensor | None = None
    extra_after: torch.Tensor | None = None
    extra_before: torch.Tensor | None = None
    extra_positions: torch.Tensor | None = None
    extra_valid: torch.Tensor | None = None
    counts: list[int] | None = None
    extra_counts: list[int] | None = None

    @property
    def num_extra(self) -> int:
        """Inserted tokens: per sample for the per-sample form; M for the batched one."""
        return 0 if self.extra is None else int(self.extra.shape[-2])


def batch_decisions(decisions: Sequence, width: int) -> Kept:
    """Per-sample decisions (`Kept` with 1-D ranks, or sorted (k_b,) rank tensors) as one batched `Kept`
    (rows padded with -1, inserted tokens padded and marked in `extra_valid`). `width` is D."""
    items = [item if isinstance(item, Kept) else Kept(ranks=item) for item in decisions]
    for b, item in enumerate(items):
        ranks = item.ranks
        if not isinstance(ranks, torch.Tensor) or ranks.dtype != torch.long or ranks.dim() != 1:
            raise RuntimeError(f"kept ranks of sample {b} must be a 1-D long tensor")
        if ranks.numel() == 0:
            raise RuntimeError(f"sample {b} keeps no visual token")
        if item.values is not None and tuple(item.values.shape) != (ranks.numel(), width):
            raise RuntimeError(f"values of sample {b} must have shape ({ranks.numel()}, {width})")
        if item.extra is not None and (item.extra.dim() != 2 or item.extra.shape[1] != width):
            raise RuntimeError(f"extra tokens of sample {b} must have shape (m, {width})")
    counts = [int(item.ranks.numel()) for item in items]
    device = items[0].ranks.device
    ranks = torch.nn.utils.rnn.pad_sequence([item.ranks for item in items], batch_first=True, padding_value=-1)
    out = Kept(ranks=ranks, counts=None if len(set(counts)) == 1 else counts)
    if any(item.values is not None for item in items):
        dtype = next(item.values.dtype for item in items if item.values is not None)
        out.values = torch.nn.utils.rnn.pad_sequence(  # nan rows: the token keeps its own hidden state
            [
                torch.full((len(item.ranks), width), float("nan"), dtype=dtype, device=device)
                if item.values is None
                else item.values
                for item in items
            ],
            batch_first=True,
        )
    extras = [item.extra.shape[0] if item.extra is not None else 0 for item in items]
    if max(extras):
        dtype = next(item.extra.dtype for item in items if item.extra is not None)

        def pad(parts, fill):
            return torch.nn.utils.rnn.pad_sequence(parts, batch_first=True, padding_value=fill)

        empty = torch.zeros(0, dtype=torch.long, device=device)
        out.extra = pad(
            [
                item.extra if item.extra is not None else torch.zeros(0, width, dtype=dtype, device=device)
                for item in items
            ],
            0.0,
        )
        out.extra_valid = pad([torch.ones(m, dtype=torch.bool, device=device) for m in extras], False)
        out.extra_counts = extras
        after = [
            item.extra_after if item.extra_after is not None else item.ranks[-1:].expand(m)
            for item, m in zip(items, extras)
        ]
        out.extra_after = pad([a if m else empty for a, m in zip(after, extras)], -1)
        out.extra_before = pad(
            [
                item.extra_before.bool()
                if item.extra_before is not None
                else torch.zeros(m, dtype=torch.bool, device=device)
                for item, m in zip(items, extras)
            ],
            False,
        )
        out.extra_positions = pad(
            [item.extra_positions if item.extra_positions is not None else a for item, a in zip(items, after)], -1
        )
    return out


class StageSelection:
    """What one stage did to each sample of the last request. Indices are visual ranks (0..V_b-1).

    The engine keeps the stage's batched tensors on the model's device; the per-sample lists below are built
    from them the first time they are read (which synchronises with the device then, not during the forward).

    kept: per sample, (k_b,) long, sorted: the original visual tokens kept.
    scores: per sample, (V_b,) float32 on the model's device: the score the method debiases and ranks by (its
        attention-derived part), before debiasing; nan for tokens pruned earlier; None for methods that do not score.
    debiased: the same after debiasing (None when the stage is not debiased).
    padding: per sample (V_b,) bool padding tokens (None when unknown).
    extra: per sample, number of tokens the stage inserted (merged/recycled); they are not visual ranks.
    keep: per sample, the stage's keep count (before any padding cap).
    notes: per request, e.g. why fewer tokens were kept.
    """

    def __init__(
        self,
        layer: int,
        num_visual: list[int],
        keep: list[int],
        padding: list,
        segments: list,
        notes,
        *,
        kept: torch.Tensor,
        ranks: torch.Tensor | None = None,
        scores=None,
        debiased=None,
        extra_valid: torch.Tensor | None = None,
        num_extra: int = 0,
    ):
        self.layer = layer
        self.num_visual = num_visual
        self.keep = keep
        self.padding = padding
        self.segments: list[list[VisualSegment]] = segments
        self._notes = notes  # a list, or a callable giving it (read lazily)
        self._kept, self._ranks, self._scores, self._debiased = kept, ranks, scores, debiased
        self._extra_valid, self._num_extra = extra_valid, num_extra
        self._lists: dict = {}

    def _per_sample(self, name: str, build):
        if name not in self._lists:
            self._lists[name] = build()
        return self._lists[name]

    @property
    def kept(self) -> list[torch.Tensor]:
        def build():
            limit = torch.tensor(self.num_visual, device=self._kept.device)[:, None]
            original = (self._kept >= 0) & (self._kept < limit)
            counts = original.sum(dim=1).tolist()
            order = torch.argsort((~original).to(torch.int8), dim=1, stable=True)
            rows = torch.gather(self._kept, 1, order)
            return [rows[b, :count] for b, count in enumerate(counts)]

        return self._per_sample("kept", build)

    def _full(self, values):
        """Per sample (V_b,) float32 over the original ranks (nan: absent) from (B, R) values at `_ranks`."""
        if values is None:
            return [None] * len(self.num_visual)
        if isinstance(values, list):  # already per sample
            return values
        width = max(self.num_visual)
        limit = torch.tensor(self.num_visual, device=values.device)[:, None]
        column = torch.where((self._ranks >= 0) & (self._ranks < limit), self._ranks, width)
        full = torch.full((values.shape[0], width + 1), float("nan"), dtype=torch.float32, device=values.device)
        full.scatter_(1, column, values.detach().float())
        return [full[b, :count] for b, count in enumerate(self.num_visual)]

    @property
    def scores(self) -> list[torch.Tensor | None]:
        return self._per_sample("scores", lambda: self._full(self._scores))

    @property
    def debiased(self) -> list[torch.Tensor | None]:
        return self._per_sample("debiased", lambda: self._full(self._debiased))

    @property
    def extra(self) -> list[int]:
        def build():
            if self._extra_valid is None:
                return [self._num_extra] * len(self.num_visual)
            return self._extra_valid.sum(dim=1).tolist()

        return self._per_sample("extra", build)

    @property
    def notes(self) -> list[str]:
        return self._per_sample("notes", lambda: list(self._notes() if callable(self._notes) else self._notes))

    def __repr__(self) -> str:
        return f"StageSelection(layer={self.layer}, keep={self.keep}, num_visual={self.num_visual})"


# --- keep counts -------------------------------------------------------------------------------------------
def resolve_keep(keep: int | float, num_visual: int, num_remaining: int, *, warn: bool = True) -> int:
    """Number of visual tokens to keep for one sample; clamps (with a warning) when `keep` exceeds what remains."""
    count = max(1, round(keep * num_visual)) if isinstance(keep, float) else int(keep)
    if count > num_remaining:
        if warn:
            warnings.warn(
                f"keep={keep} asks for {count} visual tokens but only {num_remaining} remain; keeping all "
                f"{num_remaining}. Use a fraction (e.g. keep=0.25) to scale with the image.",
                UserWarning,
                stacklevel=3,
            )
        count = num_remaining
    return count


def validate_keep(keep, name: str = "keep") -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"{name} must be an int (token count) or a float in (0, 1] (fraction), got {keep!r}")
    if isinstance(keep, float):
        if math.isnan(keep) or not (0.0 < keep <= 1.0):
            raise ValueError(f"{name}={keep}: a fractional keep must lie in (0, 1]; use an int for a count.")
    elif keep <= 0:
        raise ValueError(f"{name}={keep}: keep at least one visual token (a count >= 1 or a fraction in (0, 1]).")


def as_list(value, n: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(
            f"{name}={values} has {len(values)} entries but there are {n} stages (one per layer): give one "
            f"{name} per layer (e.g. layer=[2, 8] for two) or a single {name}"
        )
    return values


def validate_stages(stages: Sequence[Stage], num_layers: int, owner: str) -> list[Stage]:
    """Check `stages` against a model with `num_layers` decoder layers; return them as a list."""
    stages = list(stages)
    if not stages:
        raise ValueError(f"{owner} declares no stage")
    previous: Stage | None = None
    for stage in stages:
        validate_keep(stage.keep)
        if isinstance(stage.layer, bool) or not isinstance(stage.layer, int):
            raise TypeError(f"{owner}: layer must be an int, got {stage.layer!r}")
        if not (0 <= stage.layer < num_layers):
            raise ValueError(
                f"{owner}: layer={stage.layer} is out of range; the model has {num_layers} decoder layers, so "
                f"pruning can happen before layers 0..{num_layers - 1} (0 = at the language model's input)."
            )
        if stage.score_layer is not None:
            if stage.layer == 0:
                raise ValueError(f"{owner}: a stage at layer 0 (the language model's input) has no attention to score")
            if not (0 <= stage.score_layer <= stage.layer):
                raise ValueError(f"{owner}: score_layer={stage.score_layer} must lie in [0, layer={stage.layer}]")
        if previous is not None:
            if stage.layer <= previous.layer:
                raise ValueError(f"{owner}: stage layers must increase, got {[s.layer for s in stages]}")
            if stage.score_layer is not None and stage.score_layer < previous.layer:
                raise ValueError(
                    f"{owner}: the stage at layer {stage.layer} scores at layer {stage.score_layer}, before the "
                    f"previous stage has cut (layer {previous.layer})"
                )
            if stage.trim_cache:
                raise ValueError(f"{owner}: only the first stage can trim the cache of the layers before it")
            if type(stage.keep) is type(previous.keep) and stage.keep > previous.keep:
                raise ValueError(
                    f"{owner}: keep must not grow from one stage to the next, got {[s.keep for s in stages]}"
                )
        previous = stage
    return stages


# --- the shared selection rule -----------------------------------------------------------------------------
def rank_order(
    scores: torch.Tensor, padding: torch.Tensor | None = None, padding_fraction: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices of `scores` (R,) from best to worst (stable: ties keep prompt order); padding tokens (R,) bool,
    when given, always come after every real token, in prompt order. When every token is padding and
    `padding_fraction` (R,), the padded share of each token's pixels, is given, they rank from the least
    padded to the most (ties in prompt order), so an image with no real token keeps the tokens closest to its
    content, not a padding corner. No host synchronisation."""
    if padding is None:
        return torch.argsort(scores, descending=True, stable=True)
    order = torch.argsort(torch.where(padding, float("-inf"), scores), descending=True, stable=True)
    if padding_fraction is None:
        return order
    fraction = torch.where(padding.all(), padding_fraction.to(torch.float32), 0.0)  # 0: no reordering
    key = torch.where(padding, fraction, -1.0)[order]  # real tokens first
    return order[torch.argsort(key, stable=True)]


def member(elements: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """`torch.isin` for the small index sets of token selection, without a host synchronisation (torch.isin
    synchronises on CUDA)."""
    return (elements[..., None] == test).any(dim=-1)


def top_k(
    scores: torch.Tensor,
    ranks: torch.Tensor,
    count: int,
    padding: torch.Tensor | None = None,
    padding_fraction: torch.Tensor | None = None,
) -> torch.Tensor:
    """The `count` best of `ranks` (R,) by `scores` (R,), padding last (the least padded first, when
    `padding_fraction` is given); sorted visual ranks (count,)."""
    order = rank_order(scores, padding, padding_fraction)
    return torch.sort(ranks[order[:count]]).values


def equivalent_tokens(stages: Sequence[Stage], num_visual: int, num_layers: int) -> float:
    """Visual tokens present per decoder layer, averaged over the layers (the papers' "equivalent" budget):
    sum over layers of the tokens each layer processes / num_layers. Fractions resolve against `num_visual`."""
    present, total, layer = num_visual, 0.0, 0
    for stage in stages:
        total += present * (stage.layer - layer)
        layer = stage.layer
        present = min(present, resolve_keep(stage.keep, num_visual, present, warn=False))
    total += present * (num_layers - layer)
    return total / num_layers


__all__ = [
    "Positions",
    "Stage",
    "VisionStage",
    "Kept",
    "StageSelection",
    "batch_decisions",
    "resolve_keep",
    "validate_keep",
    "as_list",
    "validate_stages",
    "rank_order",
    "member",
    "top_k",
    "equivalent_tokens",
]
