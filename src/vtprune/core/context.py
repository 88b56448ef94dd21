"""What a method can ask for while it decides one stage: `StageContext`.

The engine builds one context per stage of a prefill, at the layer where the stage cuts. Everything is
computed lazily and only for the rows asked for, from the scoring layer's input (and the keys that layer
projected while it ran), so nothing here needs eager attention.

Everything is batched: the visual tokens present are padded tensors (B, R) (`ranks`, `slots`, with `present`
marking the real entries), scores are (B, R), `top_k` returns (B, K) ranks. No host synchronisation where the
keep counts are known up front. The per-sample lists (`visual_ranks`, `tokens`, ...) remain for code that
loops over samples; building them synchronises once.

Index spaces: *slots* are positions in the sequence as it is now (after earlier cuts; engine padding
included, masked); *visual ranks* number a sample's visual tokens in prompt order (0..V_b-1). Methods score
and decide in ranks (`ranks[b]` lists the ranks still present, in sequence order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, overload

import torch
from torch import nn

from ..adapters.base import ModelAdapter, VisualSegment
from .scoring import attention_probs, rotated_keys, rotated_queries
from .stages import Stage, resolve_keep

if TYPE_CHECKING:
    from ..debias import Debias

TokenKind = Literal["visual", "text", "system", "instruction", "last"]


@dataclass
class LayerInput:
    """What a decoder layer received (and projected), recorded for scoring.

    hidden_states: (B, N, D) the layer's input; position_embeddings: (cos, sin) it received;
    projected_keys: (B, N, Hkv*d) its key projection's output while it ran, or None (not run yet);
    projected_queries: (B, N, H*d) its query projection's output while it ran, or None.
    """

    index: int
    layer: nn.Module
    hidden_states: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    projected_keys: torch.Tensor | None = None
    projected_queries: torch.Tensor | None = None


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

    ranks: (B, R) long, the visual ranks of each sample's visual tokens still present, in sequence order; rows of
        samples with fewer than R end in -1 (`present` False). Tokens inserted by an earlier stage have ranks
        from V_b on.
    slots: (B, R) long, the slot of each (0 where not present); present: (B, R) bool.
    position_rank: (B, R) long, the original rank whose position each token has (the positional trend's x).
    slot_visual_rank: (B, N) visual rank of each slot (-1: not a visual token, or engine padding).
    slot_valid: (B, N) bool, real tokens (not batch or engine padding).
    slot_prompt_position: (B, N) the prompt position each slot came from (-1: engine padding).
    present_counts: per sample, how many visual tokens are present (host ints; an upper bound after a stage
        whose samples kept different numbers).
    state: per-request dict shared by the press's stages (e.g. SparseVLM's raters).
    """

    adapter: ModelAdapter
    stage_index: int
    stage: Stage
    num_stages: int
    ranks: torch.Tensor
    slots: torch.Tensor
    present: torch.Tensor
    position_rank: torch.Tensor
    slot_visual_rank: torch.Tensor
    slot_valid: torch.Tensor
    slot_prompt_position: torch.Tensor
    num_visual: list[int]
    present_counts: list[int]
    segments: list[list[VisualSegment]]
    image_span: Callable[[], torch.Tensor]  # () -> (B, 2) prompt positions of each sample's first and last visual token
    inputs: dict[int, LayerInput]
    state: dict
    vision_inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # vision layer -> (N_img, T, D) input
    vision_outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # vision layer -> (N_img, T, D) output
    vision_tokens: torch.Tensor | None = None  # (N_img, T') vision tokens left by the press's vision stages
    debias_config: Debias | None = None
    debias_active: bool = False
    padding_marks: list[torch.Tensor | None] = field(default_factory=list)  # per sample (V_b,) bool, or None
    padding_fractions: list[torch.Tensor | None] = field(default_factory=list)  # per sample (V_b,) padded share
    padding_table: torch.Tensor | None = None  # (B, max V + 1) padded share per original rank (last column 0)
    padding_threshold: float = 0.5
    request_cache: dict = field(default_factory=dict)  # per-request values the contexts of its stages share
    kv_cache: object = None  # the request's KV cache (its layers that ran hold their rotated keys)
    dry_run: bool = False  # nothing will be cut (calibration, analysis): keep counts are not warned about
    unpadded: bool = False  # host fact: every slot is a real token (no batch padding, no engine padding)
    # what the stage recorded for its StageSelection
    recorded_scores: torch.Tensor | list | None = None
    recorded_debiased: torch.Tensor | list | None = None
    notes: list = field(default_factory=list)  # strings, or callables giving a list of strings when read
    _keys: dict = field(default_factory=dict)
    _tokens: dict = field(default_factory=dict)
    _lists: dict = field(default_factory=dict)
    _made: dict = field(default_factory=dict)  # id of a (B, K) tensor top_k made -> its per-sample counts

    # --- tokens ----------------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self.ranks.shape[0]

    def batch_rows(self) -> torch.Tensor:
        """(B, 1) long arange(B), for indexing one entry per row (`values[rows, index]`); made once per request."""
        rows = self.request_cache.get("rows")
        if rows is None:
            rows = self.request_cache["rows"] = torch.arange(self.num_samples, device=self.ranks.device)[:, None]
        return rows

    def query_slots(self, kind: TokenKind) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, Q) slots of the real tokens of one kind, in sequence order, and (B, Q) bool marking the real entries
        (None: every entry is real). Kinds as in `tokens`."""
        if kind in self._tokens:
            return self._tokens[kind]
        out: tuple[torch.Tensor, torch.Tensor | None]
        if kind == "last":  # the first position where the count of real tokens reaches its maximum
            out = (self.slot_valid.cumsum(dim=1).argmax(dim=1, keepdim=True), None)
        elif kind == "visual":
            out = (self.slots, self.present)
        else:
            mask = self._text_mask(kind)
            counts = self.text_counts(kind)
            width = max(max(counts), 1)
            order = torch.argsort(mask, dim=1, descending=True, stable=True)[:, :width]  # its tokens first, in order
            out = (order, None if min(counts) == width else torch.gather(mask, 1, order))
        self._tokens[kind] = out
        return out

    def _text_mask(self, kind: TokenKind) -> torch.Tensor:
        """(B, N) bool, the slots holding real tokens of one text kind (text, system, instruction)."""
        # the prompt positions before the first visual token or after the last hold no visual token (an inserted
        # one takes a visual token's); engine padding (-1) is only excluded by `slot_valid`
        if kind == "text":
            return self.slot_valid & (self.slot_visual_rank < 0)
        position = self.slot_prompt_position
        if kind == "system":
            mask = position < self.image_span()[:, :1]
        elif kind == "instruction":
            mask = position > self.image_span()[:, 1:]
        else:
            raise ValueError(f"unknown token kind {kind!r}: use visual, text, system, instruction or last")
        return mask if self.unpadded else mask & self.slot_valid

    def text_counts(self, kind: TokenKind) -> list[int]:
        """Per sample, how many real tokens of one text kind (text, system, instruction) there are (text is never
        cut). The kinds a method declares in `Press.text_counts` are read by the engine with the prompt; any other
        is read from the device here, once per request and kind (under torch.compile: a graph break inside the
        decoder layers, which makes the compiled model run them eagerly)."""
        counts = self.request_cache.get(("count", kind))
        if counts is None:
            counts = self.request_cache[("count", kind)] = self._text_mask(kind).sum(dim=1).tolist()
        return counts

    def tokens(self, kind: TokenKind) -> list[torch.Tensor]:
        """Per sample, (Q_b,) slots of the real tokens of one kind, in sequence order.

        visual: visual tokens present; text: every other token; system: text before the first image;
        instruction: text after the last image (the question and the assistant prefix, last token included);
        last: the last token (a single slot)."""
        slots, mask = self.query_slots(kind)
        return list(slots.unbind(0)) if mask is None else self.unpad(slots, mask)

    def unpad(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per sample, the entries of `values` (B, R, ...) where `mask` (B, R) (default `present`) is True, in
        order: (R_b, ...) each. One synchronisation."""
        mask = self.present if mask is None else mask
        if mask is self.present and "present" in self._lists:
            counts = self._lists["present"]
        else:
            counts = mask.sum(dim=1).tolist()
            if mask is self.present:
                self._lists["present"] = counts
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
        return [values[b, order[b, :count]] for b, count in enumerate(counts)]

    def pad(self, values: Sequence[torch.Tensor], fill=0.0) -> torch.Tensor:
        """Per-sample values (R_b, ...) aligned with `ranks` as one (B, R, ...) tensor (`fill` where not present)."""
        self._check_shapes(values)
        width = self.ranks.shape[1]
        first = values[0]
        out = torch.full((len(values), width, *first.shape[1:]), fill, dtype=first.dtype, device=first.device)
        for b, row in enumerate(values):
            out[b, : len(row)] = row
        return out

    @property
    def visual_ranks(self) -> list[torch.Tensor]:
        """Per sample, (R_b,) the visual ranks present, in sequence order (one synchronisation)."""
        if "ranks" not in self._lists:
            self._lists["ranks"] = self.unpad(self.ranks)
        return self._lists["ranks"]

    @property
    def visual_slots(self) -> list[torch.Tensor]:
        """Per sample, (R_b,) their slots."""
        if "slots" not in self._lists:
            self._lists["slots"] = self.unpad(self.slots)
        return self._lists["slots"]

    @property
    def position_ranks(self) -> list[torch.Tensor]:
        """Per sample, (R_b,) the original rank whose position each has."""
        if "positions" not in self._lists:
            self._lists["positions"] = self.unpad(self.position_rank)
        return self._lists["positions"]

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

    def visual_hidden_states(self, layer: int | None = None) -> torch.Tensor:
        """(B, R, D) `hidden_states(layer)` of the visual tokens present (`slots`)."""
        hidden = self.hidden_states(layer)
        return torch.gather(hidden, 1, self.slots[:, :, None].expand(-1, -1, hidden.shape[-1]))

    def keys(self, layer: int | None = None) -> torch.Tensor:
        """(B, Hkv, N, d) keys of decoder `layer` (default: the score layer) with RoPE, over the current slots:
        the ones the layer projected while it ran when it has run, else projected from its input."""
        record = self._input(layer)
        if record.index not in self._keys:
            cached = self._cached_keys(record)
            if cached is not None:
                self._keys[record.index] = cached
                return cached
            if record.position_embeddings is None:
                raise ValueError(f"layer {record.index}'s input has no position embeddings: no keys to compute")
            self._keys[record.index] = rotated_keys(
                self.adapter,
                record.layer,
                record.position_embeddings,
                hidden_states=record.hidden_states,
                projected=record.projected_keys,
            )
        return self._keys[record.index]

    def _cached_keys(self, record: LayerInput) -> torch.Tensor | None:
        """(B, Hkv, N, d) the keys the layer put in the KV cache while it ran over the current slots (the same
        numbers `rotated_keys` computes), or None (no cache, or the layer has not run on this sequence)."""
        layers = getattr(self.kv_cache, "layers", None)
        if layers is None or record.index >= len(layers) or record.projected_keys is None:
            return None  # projected_keys is set while the layer runs on the recorded input
        keys = getattr(layers[record.index], "keys", None)
        hidden = record.hidden_states
        if (
            not isinstance(keys, torch.Tensor)
            or keys.dim() != 4
            or keys.shape[0] != hidden.shape[0]
            or keys.shape[2] != hidden.shape[1]
        ):
            return None
        return keys

    @property
    def all_present(self) -> bool:
        """Whether every entry of `ranks` is a token present (host fact: every sample has R)."""
        return min(self.present_counts) == self.ranks.shape[1]

    def attention(
        self,
        queries: TokenKind | torch.Tensor | Sequence[torch.Tensor],
        *,
        keys: Literal["visual", "all"] = "visual",
        heads: Literal["mean", "all"] = "mean",
        layer: int | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention paid by query tokens inside decoder `layer` (default: the stage's score layer).

        queries: a token kind, (B, Q) slots (with `query_mask` (B, Q) bool marking the real ones, default all),
        or per sample (Q_b,) slots. Each query attends causally to the real tokens up to itself (softmax over all
        of them, as in the layer). keys: "visual" gives the columns of the visual tokens present (R, aligned with
        `ranks`), "all" every slot (N). Returns (B, Q, R or N) with heads="mean" (mean over heads), (B, H, Q, R
        or N) with "all"; 0 in the rows of padded queries and the columns of masked or absent tokens.
        """
        if heads not in ("mean", "all"):
            raise ValueError(f"heads={heads!r}: use 'mean' or 'all'")
        if keys not in ("visual", "all"):
            raise ValueError(f"keys={keys!r}: use 'visual' or 'all'")
        record = self._input(layer)
        device = self.slot_valid.device
        static_last = isinstance(queries, str) and queries == "last" and self.unpadded  # the last slot of every row
        if static_last:
            query_index = None
        elif isinstance(queries, str):
            query_index, query_mask = self.query_slots(queries)
        elif isinstance(queries, torch.Tensor):
            query_index = queries.to(device).long()
        else:
            slots = [torch.as_tensor(q).long().to(device) for q in queries]
            if len(slots) != self.num_samples:
                raise ValueError(f"queries for {len(slots)} samples, the batch has {self.num_samples}")
            counts = [int(s.numel()) for s in slots]
            if min(counts) == 0:
                raise ValueError(f"a sample has no query tokens (counts per sample: {counts})")
            query_index = torch.nn.utils.rnn.pad_sequence(slots, batch_first=True)
            query_mask = (
                None
                if min(counts) == max(counts)
                else torch.nn.utils.rnn.pad_sequence(
                    [torch.ones(c, dtype=torch.bool, device=device) for c in counts], batch_first=True
                )
            )
        if query_mask is not None:  # padded queries ask as the sample's first query (zeroed below)
            query_index = torch.where(query_mask, query_index, query_index[:, :1])
        queries_rot = rotated_queries(
            self.adapter,
            record.layer,
            record.hidden_states,
            record.position_embeddings,
            query_index,
            projected=record.projected_queries,
            rows=None if query_index is None else self.batch_rows(),
        )
        batch, length = self.slot_valid.shape
        blocked: torch.Tensor | None  # (B, 1, Q or 1, N): the keys a query may not see
        if static_last:
            blocked = None  # every slot is a real token at or before it
        elif isinstance(queries, str) and queries == "last":  # every real token is at or before it
            blocked = (~self.slot_valid).view(batch, 1, 1, length)
        else:
            blocked = torch.arange(length, device=device) > query_index.view(batch, 1, -1, 1)  # causal
            if not self.unpadded:
                blocked = blocked | (~self.slot_valid).view(batch, 1, 1, length)
        probs = attention_probs(record.layer, queries_rot, self.keys(record.index), blocked)  # (B, H, Q, N)
        if heads == "mean":
            probs = probs.mean(dim=1)  # (B, Q, N)
        if keys == "visual":
            columns = self.slots[:, None, :] if heads == "mean" else self.slots[:, None, None, :]
            if columns.shape[:-1] != probs.shape[:-1]:
                columns = columns.expand(*probs.shape[:-1], -1)
            probs = torch.gather(probs, -1, columns)
            if not self.all_present:
                probs = probs * (self.present[:, None, :] if heads == "mean" else self.present[:, None, None, :])
        if query_mask is not None:
            probs = probs * (query_mask[:, :, None] if heads == "mean" else query_mask[:, None, :, None])
        return probs

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

    def _rank_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, max V) long: for each original visual rank, its image's index in the batch and its patch index in
        the image (built on the host once per request)."""
        if "rank_tables" not in self.request_cache:
            width = max(self.num_visual)
            image, patch = [], []
            for segments in self.segments:
                row_image, row_patch = [0] * width, [0] * width
                for segment in segments:
                    span = slice(segment.offset, segment.offset + segment.length)
                    row_image[span], row_patch[span] = [segment.image_index] * segment.length, range(segment.length)
                image.append(row_image)
                patch.append(row_patch)
            device = self.ranks.device
            self.request_cache["rank_tables"] = (torch.tensor(image, device=device), torch.tensor(patch, device=device))
        return self.request_cache["rank_tables"]

    def vision_attention(self, layer: int, heads: Literal["mean", "all"] = "mean") -> torch.Tensor:
        """The vision tower's [CLS] attention to each visual token present, inside vision `layer`: (B, R) (mean
        over heads) or (B, H, R), aligned with `ranks` (0 where not present)."""
        if self.adapter.vision_cls_index is None:
            raise ValueError(
                f"{type(self.adapter).__name__}'s vision tower has no [CLS] token: [CLS]-attention methods "
                "(VisionZip, FasterVLM) do not apply; use one that scores without it (e.g. divprune, dart)."
            )
        if heads not in ("mean", "all"):
            raise ValueError(f"heads={heads!r}: use 'mean' or 'all'")
        hidden = self.vision_hidden_states(layer)
        cls = self.adapter.vision_cls_index
        probs = self.adapter.vision_attention(self._vision_layer(layer), hidden, slice(cls, cls + 1))[
            :, :, 0
        ]  # (N, H, T)
        patches = probs[:, :, self.adapter.vision_first_patch :]  # (N, H, P)
        if heads == "mean":
            patches = patches.mean(dim=1, keepdim=True)
        image_of, patch_of = self._rank_tables()
        untouched = self.all_present and not any(self.dropped_any)  # every entry an original token (host fact)
        original = None if untouched else self.present & (self.ranks < image_of.shape[1])
        rank = self.ranks if original is None else torch.where(original, self.ranks, 0)
        image = torch.gather(image_of, 1, rank)  # (B, R)
        patch = torch.gather(patch_of, 1, rank).clamp(max=patches.shape[-1] - 1)
        out = patches[image, :, patch].movedim(-1, 1)  # (B, H, R)
        if original is not None:
            out = out * original[:, None, :]
        return out[:, 0] if heads == "mean" else out

    def _vision_index(self, layer: int) -> int:
        count = len(self.adapter.vision_layers)
        return layer + count if layer < 0 else layer

    def _vision_layer(self, layer: int):
        return self.adapter.vision_layers[self._vision_index(layer)]

    # --- debiasing ---------------------------------------------------------------------------------------
    @property
    def padding_share_batched(self) -> torch.Tensor | None:
        """(B, R) float32: the padded share of the pixels of each visual token present (None when the geometry is
        unknown; inserted tokens and absent entries 0)."""
        if self.padding_table is None:
            return None
        if "share" not in self._lists:
            column = torch.where(self.present, self.ranks, self.padding_table.shape[1] - 1)
            column = column.clamp(max=self.padding_table.shape[1] - 1)
            self._lists["share"] = torch.gather(self.padding_table, 1, column)
        return self._lists["share"]

    @property
    def padding_mask(self) -> torch.Tensor | None:
        """(B, R) bool: which visual tokens present are padding (None when unknown)."""
        share = self.padding_share_batched
        return None if share is None else share > self.padding_threshold

    @property
    def padding(self) -> list[torch.Tensor | None]:
        """Per sample, (R_b,) bool: which visual tokens present are padding (None when unknown; inserted tokens
        are not padding)."""
        if "padding" not in self._lists:
            mask = self.padding_mask
            unpadded = [None] * self.num_samples if mask is None else self.unpad(mask)
            self._lists["padding"] = [None if m is None else p for m, p in zip(self.padding_marks, unpadded)]
        return self._lists["padding"]

    @property
    def padding_share(self) -> list[torch.Tensor | None]:
        """Per sample, (R_b,) float: the padded share of the pixels of each visual token present (None when
        unknown; inserted tokens 0)."""
        if "padding_share" not in self._lists:
            share = self.padding_share_batched
            unpadded = [None] * self.num_samples if share is None else self.unpad(share)
            fractions = self.padding_fractions or [None] * self.num_samples
            self._lists["padding_share"] = [None if f is None else s for f, s in zip(fractions, unpadded)]
        return self._lists["padding_share"]

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

    @overload
    def debias(self, scores: torch.Tensor) -> torch.Tensor: ...

    @overload
    def debias(self, scores: Sequence[torch.Tensor]) -> list[torch.Tensor]: ...

    def debias(self, scores: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """Debias the scores (B, R) of the visual tokens present: divide by the positional trend and zero padding
        tokens, when debiasing applies at this stage (else returned as float32, unchanged). Call it on the
        attention-derived part a method ranks by; the stage's record keeps both versions. Per-sample scores
        (a list of (R_b,)) give a list."""
        if not isinstance(scores, torch.Tensor):
            return self.unpad(self.debias(self.pad([s.float() for s in scores])))
        raw = scores.float()
        self._check_shapes(raw)
        if self.recorded_scores is None:
            self.recorded_scores = raw
        if not self.debias_active:
            return raw
        padding = self.padding_mask if self.debias_config.padding else None
        out = self.debias_config.apply_batch(
            raw, self.position_rank, self.present, self.segments, padding, cache=self.request_cache
        )
        if self.recorded_debiased is None:
            self.recorded_debiased = out
        return out

    # --- selection ---------------------------------------------------------------------------------------
    def keep_counts(self, keep: int | float | None = None) -> list[int]:
        """Per sample, how many visual tokens it keeps at this stage (`keep` or the stage's), clamped to what
        remains; lowered to the real tokens when padding debiasing applies with drop_padding (which reads the
        real counts from the device: one synchronisation)."""
        keep = self.stage.keep if keep is None else keep
        counts = [
            resolve_keep(keep, self.num_visual[b], self.present_counts[b], warn=not self.dry_run)
            for b in range(self.num_samples)
        ]
        if self.debias_padding and self.debias_config.drop_padding and self.padding_mask is not None:
            real = self._real_counts()
            counts = [
                max(1, min(count, r)) if m is not None else count
                for count, r, m in zip(counts, real, self.padding_marks)
            ]
        return counts

    def keep_count(self, b: int, keep: int | float | None = None) -> int:
        """`keep_counts(keep)[b]`."""
        return self.keep_counts(keep)[b]

    def _real_counts(self) -> list[int]:
        """Per sample, the real (non-padding) visual tokens present; one synchronisation for the batch."""
        if "real" not in self._lists:
            self._lists["real"] = (self.present & ~self.padding_mask).sum(dim=1).tolist()
        return self._lists["real"]

    def _order_key(self, scores: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        """(B, R) ascending sort key of the shared rule: real tokens by score (best first), then padding tokens
        (in sequence order; in an image-less sample, the least padded first), then absent entries."""
        key = -scores.float()
        if padding is not None:
            last = torch.full_like(key, float("inf"))
            share = self.padding_share_batched
            if share is not None and self.padding_fractions:  # a sample with no real token: least padded first
                no_real = ~(self.present & ~padding).any(dim=1, keepdim=True)
                last = torch.where(no_real, share, last)
            key = torch.where(padding, last, key)
        if self.all_present:
            return key
        return key.masked_fill(~self.present, float("nan"))  # nan sorts after everything

    def _rows_of(self, order: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """(B, K) sorted ranks of the first counts[b] entries of `order` (B, >= K) per row (-1 after)."""
        width = max(counts)
        chosen = order[:, :width]
        ranks = torch.gather(self.ranks, 1, chosen)
        slots, real = torch.gather(self.slots, 1, chosen), None  # where the kept tokens sit (any order)
        if min(counts) < width:
            limit = torch.tensor(counts, device=ranks.device)[:, None]
            real = torch.arange(width, device=ranks.device) < limit
            ranks = torch.where(real, ranks, torch.iinfo(torch.long).max)
            ranks = torch.sort(ranks, dim=1).values
            ranks = ranks.masked_fill(ranks == torch.iinfo(torch.long).max, -1)
        else:
            ranks = torch.sort(ranks, dim=1).values
        self._made[id(ranks)] = (ranks, counts, (slots, real), (chosen, real))
        return ranks

    def counts_of(self, ranks: torch.Tensor) -> list[int] | None:
        """The per-sample counts of a (B, K) rank tensor this context's `top_k` made (None for any other)."""
        made = self._made.get(id(ranks))
        return made[1] if made is not None and made[0] is ranks else None

    def slots_of(self, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """For a (B, K) rank tensor this context's `top_k` made: the (B, K) slots of its entries in the current
        sequence (in no particular order) and (B, K) bool marking the kept tokens among them (None: all; the
        others may be any slot, text included); else None."""
        made = self._made.get(id(ranks))
        return made[2] if made is not None and made[0] is ranks and len(made) > 2 else None

    def columns_of(self, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """For a (B, K) rank tensor this context's `top_k` made: the (B, K) columns of `ranks` (the index into R) of
        its entries (in no particular order) and (B, K) bool marking the kept tokens among them (None: all);
        else None."""
        made = self._made.get(id(ranks))
        return made[3] if made is not None and made[0] is ranks and len(made) > 3 else None

    def top_k(self, scores: torch.Tensor | Sequence[torch.Tensor], keep: int | float | None = None):
        """The shared selection rule: per sample, the `keep_counts` best visual ranks by `scores` (B, R);
        returns (B, K) long, each row sorted, K the largest count (rows of samples keeping fewer end in -1). Ties
        keep sequence order; when padding debiasing applies, padding tokens rank after every real token, and an
        image with no real token at all keeps its least-padded tokens (the ones nearest its content, not a
        padding corner). The stage's notes say when padding tokens had to be kept. Per-sample scores (a list)
        give per-sample ranks (a list)."""
        if not isinstance(scores, torch.Tensor):
            return self._per_sample_ranks(self.top_k(self.pad([s.float() for s in scores]), keep))
        scores = self._accepted_scores(scores)
        counts = self.keep_counts(keep)
        padding = self.padding_mask if self.debias_padding else None
        if padding is None and self.all_present:  # by score alone (descending and stable: ties in sequence order)
            order = torch.argsort(scores, dim=1, descending=True, stable=True)
        else:
            order = torch.argsort(self._order_key(scores, padding), dim=1, stable=True)
        if padding is not None:
            self._note_padding(padding, counts)
        return self._rows_of(order, counts)

    def _per_sample_ranks(self, ranks: torch.Tensor) -> list[torch.Tensor]:
        """(B, K) ranks padded with -1 -> per sample, its (K_b,) ranks."""
        counts = self.counts_of(ranks)
        return [ranks[b, :count] for b, count in enumerate(counts)]

    def _accepted_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """`scores` (B, R) as float, checked against the stage's shapes, and recorded if they are the first."""
        scores = scores.float()
        self._check_shapes(scores)
        if self.recorded_scores is None:
            self.recorded_scores = scores
        return scores

    def _note_padding(self, padding: torch.Tensor, counts: list[int]) -> None:
        """Notes (built when the record is read) for samples whose kept tokens include padding."""
        real_tokens = (self.present & ~padding).sum(dim=1)
        present_tokens = self.present.sum(dim=1)

        def notes() -> list[str]:
            out = []
            for b, (real, present) in enumerate(zip(real_tokens.tolist(), present_tokens.tolist())):
                if self.padding_marks[b] is None or counts[b] <= real:
                    continue
                if real == 0:
                    out.append(
                        f"sample {b}: every one of its {present} visual tokens is mostly padding (the image "
                        f"has almost no content on the model's grid): kept the {counts[b]} least-padded"
                    )
                else:
                    out.append(
                        f"sample {b}: only {real} of its {present} visual tokens are real: {counts[b] - real} "
                        f"padding token(s) fill the {counts[b]} kept"
                    )
            return out

        self.notes.append(notes)

    def top_k_per_image(self, scores: torch.Tensor | Sequence[torch.Tensor], keep: int | float | None = None):
        """`top_k` with the budget applied to each image of a sample on its own (a count per image, or a fraction
        of each image's tokens), as the vision-side methods do; padding rules as in `top_k` (per image)."""
        if not isinstance(scores, torch.Tensor):
            return self._per_sample_ranks(self.top_k_per_image(self.pad([s.float() for s in scores]), keep))
        scores = self._accepted_scores(scores)
        keep = self.stage.keep if keep is None else keep
        padding = self.padding_mask if self.debias_padding else None
        drop = padding is not None and self.debias_config.drop_padding
        # per image, what is still present (all of it before any cut) and real (one synchronisation each)
        remaining = self._per_image() if any(self.dropped_any) else None
        real = self._per_image(padding) if drop else None
        images = self._num_images()
        starts, budgets, counts = [], [], []
        for b, segments in enumerate(self.segments):
            start_row, budget_row, start = [0] * (images + 1), [0] * (images + 1), 0
            for segment in segments:
                index = segment.image_index
                present = segment.length if remaining is None else remaining[b][index]
                count = resolve_keep(keep, segment.length, present, warn=not self.dry_run)
                if drop and self.padding_marks[b] is not None:
                    count = max(1, min(count, real[b][index]))
                start_row[index], budget_row[index] = start, count
                start += present
            starts.append(start_row)
            budgets.append(budget_row)
            counts.append(sum(budget_row))
        image, original = self._image_of_present()
        group = torch.where(original, image, images)  # (B, R): absent and inserted tokens after every image
        order = torch.argsort(self._order_key(scores, padding), dim=1, stable=True)
        order = torch.gather(order, 1, torch.argsort(torch.gather(group, 1, order), dim=1, stable=True))
        group = torch.gather(group, 1, order)  # grouped by image, each image's tokens best first
        device = self.ranks.device
        position = torch.arange(order.shape[1], device=device) - torch.gather(
            torch.tensor(starts, device=device), 1, group
        )
        chosen = position < torch.gather(torch.tensor(budgets, device=device), 1, group)
        first = torch.gather(order, 1, torch.argsort((~chosen).to(torch.int8), dim=1, stable=True))
        if padding is not None:
            self._note_padding(padding, counts)
        return self._rows_of(first, counts)

    @property
    def dropped_any(self) -> list[bool]:
        """Per sample, whether an earlier stage changed its visual tokens (host)."""
        return [count != visual for count, visual in zip(self.present_counts, self.num_visual)]

    def _num_images(self) -> int:
        return 1 + max(segment.image_index for segments in self.segments for segment in segments)

    def _image_of_present(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, R) image index of each visual token present, and (B, R) bool: an original (not inserted) one."""
        image_of, _ = self._rank_tables()
        original = self.present & (self.ranks < image_of.shape[1])
        return torch.gather(image_of, 1, torch.where(original, self.ranks, 0)), original

    def _per_image(self, padding: torch.Tensor | None = None) -> list[list[int]]:
        """Per sample, per image index, its original tokens present (and not padding); one synchronisation."""
        image, original = self._image_of_present()
        if padding is not None:
            original = original & ~padding
        counts = torch.zeros(self.num_samples, self._num_images(), dtype=torch.long, device=image.device)
        return counts.scatter_add_(1, image, original.long()).tolist()

    def vision_survivors(self) -> torch.Tensor:
        """(B, K) sorted visual ranks whose patches are still in the vision tower's output after the press's
        vision stages: what a stage at layer 0 keeps to remove the others from the language model."""
        if self.vision_tokens is None:
            raise ValueError("no vision stage ran: declare vision_stages() and run the model on pixel_values")
        patches = self.vision_tokens - self.adapter.vision_first_patch  # (N, T'), -1 for [CLS]
        per_image = self.vision_tokens.shape[1] - int(self.adapter.vision_cls_index is not None)
        image_of, patch_of = self._rank_tables()
        width = max(segment.length for segments in self.segments for segment in segments)
        alive = torch.zeros(patches.shape[0], width + 1, dtype=torch.bool, device=patches.device)
        alive.scatter_(1, (patches + 1).clamp(min=0, max=width), True)  # column 0: [CLS]
        kept = alive[:, 1:][image_of, patch_of]  # (B, max V) by original rank
        limit = torch.tensor(self.num_visual, device=kept.device)[:, None]
        kept = kept & (torch.arange(kept.shape[1], device=kept.device) < limit)
        counts = [sum(min(per_image, segment.length) for segment in segments) for segments in self.segments]
        order = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, : max(counts)]
        ranks = torch.where(torch.gather(kept, 1, order), order, -1)
        self._made[id(ranks)] = (ranks, counts)
        return ranks

    def vision_keys(self, layer: int) -> torch.Tensor:
        """(N_img, H, T, d) keys of vision-tower `layer` (its k projection of its normed input, bias included)."""
        hidden = self.vision_hidden_states(layer)
        vision_layer = self._vision_layer(layer)
        attn = vision_layer.self_attn
        keys = attn.k_proj(vision_layer.layer_norm1(hidden))
        return keys.view(*hidden.shape[:2], -1, attn.head_dim).transpose(1, 2)

    def _check_shapes(self, scores) -> None:
        if isinstance(scores, torch.Tensor):
            if scores.shape != self.ranks.shape:
                raise RuntimeError(
                    f"scores have shape {tuple(scores.shape)}, expected {tuple(self.ranks.shape)} (B, R): one per "
                    "visual token present, aligned with ctx.ranks"
                )
            return
        if len(scores) != self.num_samples:
            raise RuntimeError(f"scores for {len(scores)} samples, the batch has {self.num_samples}")
        for b, values in enumerate(scores):
            if values.shape[:1] != self.visual_ranks[b].shape:
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
