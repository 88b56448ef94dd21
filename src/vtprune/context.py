"""What a method can ask for while it decides one stage: `StageContext`.

The engine builds one context per stage of a prefill, at the layer where the stage cuts. Everything is
computed lazily and only for the rows asked for, from the scoring layer's input (and the keys that layer
projected while it ran), so nothing here needs eager attention. Per-sample results are lists, because samples
of a batch keep different numbers of tokens.

Index spaces: *slots* are positions in the sequence as it is now (after earlier cuts; engine padding
included, masked); *visual ranks* number a sample's visual tokens in prompt order (0..V_b-1). Methods score
and decide in ranks (`visual_ranks[b]` lists the ranks still present, in sequence order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Sequence

import torch
from torch import nn

from .adapters.base import ModelAdapter, VisualSegment
from .scoring import attention_probs, rotated_keys, rotated_queries
from .stages import Stage, resolve_keep, top_k

if TYPE_CHECKING:
    from .debias import Debias

TokenKind = Literal["visual", "text", "system", "instruction", "last"]


@dataclass
class LayerInput:
    """What a decoder layer received (and projected), recorded for scoring.

    hidden_states: (B, N, D) the layer's input; position_embeddings: (cos, sin) it received;
    projected_keys: (B, N, Hkv*d) its key projection's output while it ran, or None (not run yet).
    """

    index: int
    layer: nn.Module
    hidden_states: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    projected_keys: torch.Tensor | None = None


@dataclass
class VisionStageContext:
    """One vision stage (inside the vision tower), as a method sees it. Tensors run over the images of the
    batch (N) and the tokens still in the vision tower's sequence (T).

    tokens: (N, T) each token's index in the full vision sequence (the [CLS] token, if any, is 0 and stays).
    """

    adapter: ModelAdapter
    stage_index: int
    layer: nn.Module
    merge: int  # tokens of each image that leave at this stage
    tokens: torch.Tensor
    input: torch.Tensor  # (N, T, D) the layer's input
    attention_output: torch.Tensor  # (N, T, D) its attention block's output (before the residual)
    output: torch.Tensor  # (N, T, D) the layer's output

    def attention(self, heads: Literal["mean", "all"] = "mean") -> torch.Tensor:
        """(N, T, T) (or (N, H, T, T)) attention probabilities inside the layer, every query row."""
        rows = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        probs = self.adapter.vision_attention(self.layer, self.input, rows)
        return probs.mean(dim=1) if heads == "mean" else probs

    def post_attention(self) -> torch.Tensor:
        """(N, T, D) the residual stream after the attention block (where the official merges happen)."""
        return self.input + self.attention_output

    def finish(self, residual: torch.Tensor) -> torch.Tensor:
        """The layer's output for residual-stream values (..., D): the block's MLP half applied to them."""
        return self.adapter.vision_block_tail(self.layer, residual)


@dataclass
class StageContext:
    """One stage of one request, as a method sees it.

    visual_slots[b] / visual_ranks[b]: (R_b,) slots and visual ranks of sample b's visual tokens still present
        (tokens inserted by an earlier stage have ranks from V_b on).
    position_ranks[b]: (R_b,) the original rank whose position each of them has (the positional trend's x).
    slot_visual_rank: (B, N) visual rank of each slot (-1: not a visual token, or engine padding).
    slot_valid: (B, N) bool, real tokens (not batch or engine padding).
    slot_prompt_position: (B, N) the prompt position each slot came from (-1: engine padding).
    state: per-request dict shared by the press's stages (e.g. SparseVLM's raters).
    """

    adapter: ModelAdapter
    stage_index: int
    stage: Stage
    num_stages: int
    visual_slots: list[torch.Tensor]
    visual_ranks: list[torch.Tensor]
    position_ranks: list[torch.Tensor]
    slot_visual_rank: torch.Tensor
    slot_valid: torch.Tensor
    slot_prompt_position: torch.Tensor
    num_visual: list[int]
    segments: list[list[VisualSegment]]
    image_span: torch.Tensor  # (B, 2) prompt positions of each sample's first and last visual token
    inputs: dict[int, LayerInput]
    state: dict
    vision_inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # vision layer -> (N_img, T, D) input
    vision_outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # vision layer -> (N_img, T, D) output
    vision_tokens: torch.Tensor | None = None  # (N_img, T') vision tokens left by the press's vision stages
    debias_config: "Debias | None" = None
    debias_active: bool = False
    padding_marks: list[torch.Tensor | None] = field(default_factory=list)  # per sample (V_b,) bool, or None
    padding_fractions: list[torch.Tensor | None] = field(default_factory=list)  # per sample (V_b,) padded share
    dry_run: bool = False  # nothing will be cut (calibration, analysis): keep counts are not warned about
    # what the stage recorded for its StageSelection
    recorded_scores: list[torch.Tensor] | None = None
    recorded_debiased: list[torch.Tensor] | None = None
    notes: list[str] = field(default_factory=list)
    _keys: dict = field(default_factory=dict)
    _tokens: dict = field(default_factory=dict)
    _real: list[int] | None = None
    _padding: list | None = None
    _padding_share: list | None = None

    # --- tokens ----------------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return len(self.visual_ranks)

    def tokens(self, kind: TokenKind) -> list[torch.Tensor]:
        """Per sample, (Q_b,) slots of the real tokens of one kind, in sequence order.

        visual: visual tokens present; text: every other token; system: text before the first image;
        instruction: text after the last image (the question and the assistant prefix, last token included);
        last: the last token (a single slot)."""
        if kind in self._tokens:
            return self._tokens[kind]
        valid, visual = self.slot_valid, self.slot_visual_rank >= 0
        position = self.slot_prompt_position
        if kind == "last":
            length = valid.shape[1]
            last = torch.where(valid, torch.arange(length, device=valid.device), -1).max(dim=1).values
            out = [last[b : b + 1] for b in range(self.num_samples)]
        else:
            if kind == "visual":
                mask = valid & visual
            elif kind == "text":
                mask = valid & ~visual
            elif kind == "system":
                mask = valid & ~visual & (position < self.image_span[:, :1])
            elif kind == "instruction":
                mask = valid & ~visual & (position > self.image_span[:, 1:])
            else:
                raise ValueError(f"unknown token kind {kind!r}: use visual, text, system, instruction or last")
            out = rows_where(mask)
        self._tokens[kind] = out
        return out

    # --- model internals ---------------------------------------------------------------------------------
    def _input(self, layer: int | None) -> LayerInput:
        index = self.stage.score_layer if layer is None else layer
        if index is None or index not in self.inputs:
            available = sorted(self.inputs)
            raise ValueError(
                f"stage {self.stage_index} (layer {self.stage.layer}) has no recorded input of layer {index}; "
                f"recorded: {available}. Declare the layer as the stage's score_layer."
            )
        return self.inputs[index]

    def hidden_states(self, layer: int | None = None) -> torch.Tensor:
        """(B, N, D) input of decoder `layer` (default: the stage's score layer; 0: the language model's
        input embeddings) over the current slots."""
        return self._input(layer).hidden_states

    def keys(self, layer: int | None = None) -> torch.Tensor:
        """(B, Hkv, N, d) keys of decoder `layer` (default: the score layer) with RoPE, over the current slots:
        the ones the layer projected while it ran when it has run, else projected from its input."""
        record = self._input(layer)
        if record.index not in self._keys:
            if record.position_embeddings is None:
                raise ValueError(f"layer {record.index}'s input has no position embeddings: no keys to compute")
            self._keys[record.index] = rotated_keys(
                self.adapter, record.layer, record.position_embeddings,
                hidden_states=record.hidden_states, projected=record.projected_keys,
            )
        return self._keys[record.index]

    def attention(
        self,
        queries: TokenKind | Sequence[torch.Tensor],
        *,
        keys: Literal["visual", "all"] = "visual",
        heads: Literal["mean", "all"] = "mean",
        layer: int | None = None,
    ) -> list[torch.Tensor]:
        """Attention paid by query tokens inside decoder `layer` (default: the stage's score layer).

        queries: a token kind, or per sample (Q_b,) slots. Each query attends causally to the real tokens up to
        itself (softmax over all of them, as in the layer). keys: "visual" returns the columns of the visual
        tokens present (R_b, in `visual_ranks[b]` order), "all" every slot (N; masked slots 0).
        Returns per sample (Q_b, R_b or N) with heads="mean" (mean over heads), (H, Q_b, R_b or N) with "all".
        """
        record = self._input(layer)
        slots = self.tokens(queries) if isinstance(queries, str) else [torch.as_tensor(q).long() for q in queries]
        if len(slots) != self.num_samples:
            raise ValueError(f"queries for {len(slots)} samples, the batch has {self.num_samples}")
        counts = [int(s.numel()) for s in slots]
        if min(counts) == 0:
            raise ValueError(f"a sample has no query tokens (counts per sample: {counts})")
        width = max(counts)
        device = self.slot_valid.device
        query_index = torch.stack([torch.cat([s.to(device), s[-1:].to(device).expand(width - len(s))]) for s in slots])
        queries_rot = rotated_queries(self.adapter, record.layer, record.hidden_states, record.position_embeddings, query_index)
        length = self.slot_valid.shape[1]
        allowed = self.slot_valid[:, None, :] & (
            torch.arange(length, device=device)[None, None, :] <= query_index[:, :, None]
        )
        probs = attention_probs(record.layer, queries_rot, self.keys(record.index), allowed)  # (B, H, Qmax, N)
        if heads == "mean":
            probs = probs.mean(dim=1)  # (B, Qmax, N)
        elif heads != "all":
            raise ValueError(f"heads={heads!r}: use 'mean' or 'all'")
        out = []
        for b, count in enumerate(counts):
            rows = probs[b, :count] if heads == "mean" else probs[b, :, :count]
            if keys == "visual":
                rows = rows[..., self.visual_slots[b]]
            elif keys != "all":
                raise ValueError(f"keys={keys!r}: use 'visual' or 'all'")
            out.append(rows)
        return out

    # --- vision tower ------------------------------------------------------------------------------------
    def vision_hidden_states(self, layer: int, output: bool = False) -> torch.Tensor:
        """(N_img, T, D) input (or, with output=True, output) of vision-tower `layer` (declared by the press's
        `vision_layers`), every image of the batch in prompt order; T = the [CLS] token (if any) + patches."""
        index = self._vision_index(layer)
        recorded = self.vision_outputs if output else self.vision_inputs
        if index not in recorded:
            raise ValueError(
                f"the vision tower's layer {layer} was not recorded: declare it in the press's vision_layers(), and "
                "run the model on pixel_values (precomputed image features skip the vision tower)."
            )
        return recorded[index]

    def vision_attention(self, layer: int, heads: Literal["mean", "all"] = "mean") -> list[torch.Tensor]:
        """The vision tower's [CLS] attention to each visual token present, inside vision `layer`: per sample
        (R_b,) (mean over heads) or (H, R_b), its images' patches in order (`visual_ranks[b]`)."""
        if self.adapter.vision_cls_index is None:
            raise ValueError(
                f"{type(self.adapter).__name__}'s vision tower has no [CLS] token: [CLS]-attention methods "
                "(VisionZip, FasterVLM) do not apply; use one that scores without it (e.g. divprune, dart)."
            )
        hidden = self.vision_hidden_states(layer)
        rows = torch.tensor([self.adapter.vision_cls_index], device=hidden.device)
        probs = self.adapter.vision_attention(self._vision_layer(layer), hidden, rows)[:, :, 0]  # (N, H, T)
        patches = probs[:, :, self.adapter.vision_first_patch:]  # (N, H, P)
        if heads == "mean":
            patches = patches.mean(dim=1, keepdim=True)
        elif heads != "all":
            raise ValueError(f"heads={heads!r}: use 'mean' or 'all'")
        out = []
        for b, segments in enumerate(self.segments):
            full = torch.cat([patches[segment.image_index, :, : segment.length] for segment in segments], dim=-1)
            present = full[:, self.visual_ranks[b].clamp(max=full.shape[-1] - 1)]
            out.append(present[0] if heads == "mean" else present)
        return out

    def _vision_index(self, layer: int) -> int:
        count = len(self.adapter.vision_layers)
        return layer + count if layer < 0 else layer

    def _vision_layer(self, layer: int):
        return self.adapter.vision_layers[self._vision_index(layer)]

    # --- debiasing ---------------------------------------------------------------------------------------
    @property
    def padding(self) -> list[torch.Tensor | None]:
        """Per sample, (R_b,) bool: which visual tokens present are padding (None when unknown; inserted tokens
        are not padding)."""
        if self._padding is not None:
            return self._padding
        out = []
        for marks, ranks in zip(self.padding_marks, self.visual_ranks):
            if marks is None:
                out.append(None)
                continue
            original = ranks < marks.numel()
            out.append(torch.where(original, marks[ranks.clamp(max=marks.numel() - 1)], False))
        self._padding = out
        return out

    @property
    def padding_share(self) -> list[torch.Tensor | None]:
        """Per sample, (R_b,) float: the padded share of the pixels of each visual token present (None when
        unknown; inserted tokens 0)."""
        if self._padding_share is not None:
            return self._padding_share
        out = []
        fractions = self.padding_fractions or [None] * self.num_samples
        for share, ranks in zip(fractions, self.visual_ranks):
            if share is None:
                out.append(None)
                continue
            original = ranks < share.numel()
            out.append(torch.where(original, share[ranks.clamp(max=share.numel() - 1)].float(), 0.0))
        self._padding_share = out
        return out

    def padding_share_or_none(self, b: int) -> torch.Tensor | None:
        """Sample b's `padding_share` when padding debiasing applies and the geometry is known, else None (the
        argument `stages.rank_order` takes to keep an image without content at its least-padded tokens)."""
        if not self.debias_padding or not self.padding_fractions:
            return None
        return self.padding_share[b]

    @property
    def debias_padding(self) -> bool:
        """Whether padding debiasing applies at this stage."""
        return self.debias_active and self.debias_config.padding

    def debias(self, scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Debias per-sample scores (R_b,) of the visual tokens present: divide by the positional trend and zero
        padding tokens, when debiasing applies at this stage (else returned as float32, unchanged). Call it on
        the attention-derived part a method ranks by; the stage's record keeps both versions."""
        raw = [s.float() for s in scores]
        self._check_shapes(raw)
        if self.recorded_scores is None:
            self.recorded_scores = raw
        if not self.debias_active:
            return raw
        padding = self.padding if self.debias_config.padding else [None] * self.num_samples
        out = self.debias_config.apply_batch(raw, self.position_ranks, self.segments, padding)
        if self.recorded_debiased is None:
            self.recorded_debiased = out
        return out

    # --- selection ---------------------------------------------------------------------------------------
    def keep_count(self, b: int, keep: int | float | None = None) -> int:
        """How many visual tokens sample b keeps at this stage (`keep` or the stage's), clamped to what remains;
        lowered to the real tokens when padding debiasing applies with drop_padding."""
        count = resolve_keep(self.stage.keep if keep is None else keep, self.num_visual[b], len(self.visual_ranks[b]),
                             warn=not self.dry_run)
        if self.debias_padding and self.debias_config.drop_padding and self.padding[b] is not None:
            count = max(1, min(count, self._real_counts()[b]))
        return count

    def _real_counts(self) -> list[int]:
        """Per sample, the real (non-padding) visual tokens present; one synchronisation for the batch."""
        if self._real is None:
            counts = [(~p).sum() if p is not None else torch.tensor(0) for p in self.padding]
            self._real = torch.stack([c.to(self.slot_valid.device) for c in counts]).tolist()
        return self._real

    def top_k(self, scores: Sequence[torch.Tensor], keep: int | float | None = None) -> list[torch.Tensor]:
        """The shared selection rule: per sample, the `keep_count` best visual ranks by `scores` (R_b,), sorted;
        ties keep sequence order; when padding debiasing applies, padding tokens rank after every real token,
        and an image with no real token at all keeps its least-padded tokens (the ones nearest its content, not
        a padding corner). The stage's notes say when padding tokens had to be kept."""
        scores = [s.float() for s in scores]
        self._check_shapes(scores)
        if self.recorded_scores is None:
            self.recorded_scores = scores
        kept = []
        for b, values in enumerate(scores):
            padding = self.padding[b] if self.debias_padding else None
            count = self.keep_count(b, keep)
            real = self._real_counts()[b] if padding is not None else None
            kept.append(top_k(values, self.visual_ranks[b], count, padding, self.padding_share_or_none(b)))
            if real is not None and count > real:
                present = len(self.visual_ranks[b])
                if real == 0:
                    self.notes.append(
                        f"sample {b}: every one of its {present} visual tokens is mostly padding (the image has "
                        f"almost no content on the model's grid): kept the {count} least-padded"
                    )
                else:
                    self.notes.append(
                        f"sample {b}: only {real} of its {present} visual tokens are real: {count - real} padding "
                        f"token(s) fill the {count} kept"
                    )
        return kept

    def top_k_per_image(self, scores: Sequence[torch.Tensor], keep: int | float | None = None) -> list[torch.Tensor]:
        """`top_k` with the budget applied to each image of a sample on its own (a count per image, or a fraction
        of each image's tokens), as the vision-side methods do; padding rules as in `top_k`."""
        scores = [s.float() for s in scores]
        self._check_shapes(scores)
        if self.recorded_scores is None:
            self.recorded_scores = scores
        keep = self.stage.keep if keep is None else keep
        kept = []
        for b, values in enumerate(scores):
            ranks, padding = self.visual_ranks[b], (self.padding[b] if self.debias_padding else None)
            all_present = len(ranks) == self.num_visual[b]
            parts = []
            for segment in self.segments[b]:
                if all_present:  # ranks 0..V-1 in order: the image is a slice
                    inside = torch.arange(segment.offset, segment.offset + segment.length, device=ranks.device)
                else:
                    inside = torch.nonzero((ranks >= segment.offset) & (ranks < segment.offset + segment.length)).flatten()
                count = resolve_keep(keep, segment.length, len(inside), warn=not self.dry_run)
                part_padding = None if padding is None else padding[inside]
                if part_padding is not None:
                    real = int((~part_padding).sum())
                    if self.debias_config.drop_padding:
                        count = max(1, min(count, real))
                    if real == 0 and self.padding_fractions:
                        self.notes.append(
                            f"sample {b}, image {segment.image_index}: every one of its {len(inside)} visual tokens "
                            f"is mostly padding: kept the {count} least-padded"
                        )
                share = self.padding_share_or_none(b)
                parts.append(top_k(values[inside], ranks[inside], count, part_padding,
                                   None if share is None else share[inside]))
            kept.append(torch.sort(torch.cat(parts)).values)
        return kept

    def vision_survivors(self) -> list[torch.Tensor]:
        """Per sample, the visual ranks whose patches are still in the vision tower's output after the press's
        vision stages (sorted): what a stage at layer 0 keeps to remove the others from the language model."""
        if self.vision_tokens is None:
            raise ValueError("no vision stage ran: declare vision_stages() and run the model on pixel_values")
        patches = self.vision_tokens - self.adapter.vision_first_patch  # (N, T'), -1 for [CLS]
        out = []
        for segments in self.segments:
            parts = [segment.offset + patches[segment.image_index][patches[segment.image_index] >= 0] for segment in segments]
            out.append(torch.sort(torch.cat(parts)).values)
        return out

    def vision_keys(self, layer: int) -> torch.Tensor:
        """(N_img, H, T, d) keys of vision-tower `layer` (its k projection of its normed input, bias included)."""
        hidden = self.vision_hidden_states(layer)
        vision_layer = self._vision_layer(layer)
        attn = vision_layer.self_attn
        keys = attn.k_proj(vision_layer.layer_norm1(hidden))
        return keys.view(*hidden.shape[:2], -1, attn.head_dim).transpose(1, 2)

    def _check_shapes(self, scores: Sequence[torch.Tensor]) -> None:
        if len(scores) != self.num_samples:
            raise RuntimeError(f"scores for {len(scores)} samples, the batch has {self.num_samples}")
        for b, values in enumerate(scores):
            if values.shape != self.visual_ranks[b].shape:
                raise RuntimeError(
                    f"scores of sample {b} have shape {tuple(values.shape)}, expected "
                    f"{tuple(self.visual_ranks[b].shape)} (one per visual token present)"
                )


def rows_where(mask: torch.Tensor) -> list[torch.Tensor]:
    """Per row of `mask` (B, N) bool, the (n_b,) long indices where it is True, in order; one host sync."""
    counts = mask.sum(dim=1).tolist()
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    return [order[b, :count] for b, count in enumerate(counts)]


__all__ = ["StageContext", "VisionStageContext", "LayerInput", "TokenKind", "rows_where"]
