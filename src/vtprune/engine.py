"""The pruning engine: the only code that cuts sequences.

`PruningSession` attaches a press to a model with forward pre-hooks (removed on exit; the model's modules,
weights and attributes are never modified). Per forward call:

* **Prefill** (the prompt contains visual tokens): the input hook finds the visual tokens (adapter). At each
  stage's scoring layer the press scores the visual tokens still present, debiasing is applied, top-k is
  taken. Before the stage's layer, the engine gathers the kept positions of the hidden states, and from then
  on hands every later layer the matching rows/columns of the model's own attention mask, RoPE cos/sin and
  position ids. Kept tokens keep their original positions. When samples of a batch keep different numbers
  of tokens, shorter ones are left-padded with masked slots.
* **Decode** (no visual tokens, continuing the cache filled by that prefill): nothing is pruned; layers
  after a cut get the columns of the model's mask that match what their KV-cache holds
  (kept prompt tokens, then every generated token). Positions continue the original numbering.

Sequence indices below: "orig" = position in the uncut prompt; "slot" = position in the current, cut
sequence. A slot whose orig is -1 is padding inserted by the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from .adapters import adapter_for
from .adapters.base import VisualLayout
from .press import Stage, StageSelection, resolve_keep
from .scoring import attention_rows

if TYPE_CHECKING:
    from .press import Press


@dataclass
class StageContext:
    """What a press sees when scoring one stage (prefill only).

    visual_slots[b]: (R_b,) slots of sample b's visual tokens still present.
    visual_ranks[b]: (R_b,) their indices among the sample's visual tokens (0..V_b-1).
    """

    session: "PruningSession"
    stage_index: int
    stage: Stage
    layer: nn.Module
    hidden_states: torch.Tensor  # (B, N, D) input of `layer`
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    visual_slots: list[torch.Tensor]
    visual_ranks: list[torch.Tensor]
    key_valid: torch.Tensor  # (B, N) bool: real (non-padding) tokens
    slot_orig: torch.Tensor  # (B, N) long

    def last_token_slot(self) -> torch.Tensor:
        """(B,) slot of each sample's last real token (handles left and right padding)."""
        length = self.key_valid.shape[1]
        ar = torch.arange(length, device=self.key_valid.device).expand_as(self.key_valid)
        return torch.where(self.key_valid, ar, -1).max(dim=1).values

    def attention_to_visual(self, query_slots: torch.Tensor) -> list[torch.Tensor]:
        """Head- and query-averaged attention paid by `query_slots` (B, Q) to each remaining visual token.

        Returns per sample (R_b,) float32. Computed from this layer's input (see `vtprune.scoring`)."""
        orig = self.slot_orig
        query_orig = torch.gather(orig, 1, query_slots)  # (B, Q)
        allowed = self.key_valid[:, None, :] & (orig[:, None, :] <= query_orig[:, :, None])  # causal
        probs = attention_rows(
            self.session.adapter,
            self.layer,
            self.hidden_states,
            self.position_embeddings,
            query_slots,
            allowed,
        )  # (B, H, Q, N)
        mean = probs.mean(dim=(1, 2))  # (B, N)
        return [mean[b, slots] for b, slots in enumerate(self.visual_slots)]


@dataclass
class _Request:
    """Per-request state, rebuilt at every prefill (never shared between requests)."""

    input_len: int
    layout: VisualLayout
    visual_rank0: torch.Tensor  # (B, N0) long: index among the sample's visual tokens, -1 otherwise
    valid0: torch.Tensor  # (B, N0) bool: from the 2-D attention mask
    padding: list[torch.Tensor | None]  # per sample (V_b,) bool, or None
    slots: torch.Tensor  # (B, N_cur) long: orig position of each slot, -1 = engine padding
    selections: list[StageSelection] = field(default_factory=list)
    kept: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # stage -> kept ranks per sample
    stage_slots: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (layer, slots) after each cut
    cache: object = None
    phase: str = "prefill"
    # model inputs for the full-length prompt, captured at the first decoder layer
    mask0: object = None
    position_embeddings0: tuple[torch.Tensor, torch.Tensor] | None = None
    position_ids0: torch.Tensor | None = None
    captured: bool = False
    # what layers after the last cut receive in place of the model's full-length tensors
    current: dict | None = None
    step: dict = field(default_factory=dict)  # decode: cache length before the step, masks per stage


class PruningSession:
    """Context manager returned by `press(model, ...)`: attaches on enter, restores the model on exit."""

    def __init__(self, press: "Press", model: nn.Module, *, processor=None, image_sizes: Sequence | None = None):
        self.press = press
        self.model = model
        self.adapter = adapter_for(model)
        self.num_layers = len(self.adapter.decoder_layers)
        self.stages = press.validate(self.num_layers)
        self.cut_layers = [stage.layer for stage in self.stages]
        self.processor = processor
        self.image_sizes = [tuple(int(v) for v in size) for size in image_sizes] if image_sizes is not None else None
        debias = press.debias
        if debias is not None and debias.padding and (processor is None or image_sizes is None):
            raise ValueError(
                "padding debiasing needs the image geometry: call press(model, processor=processor, "
                "image_sizes=[image.size, ...]) with the original size of every image in the batch, "
                "or turn it off with Debias(padding=False)."
            )
        self._handles: list = []
        self._request: _Request | None = None

    # --- context manager -----------------------------------------------------------------------------
    def __enter__(self) -> "PruningSession":
        if self._handles:
            raise RuntimeError("this pruning session is already active")
        self.press.last_selection = []
        self._handles.append(
            self.adapter.input_module.register_forward_pre_hook(self._on_input, with_kwargs=True)
        )
        if self.model is not self.adapter.input_module:
            self._handles.append(self.model.register_forward_pre_hook(self._on_outer_input, with_kwargs=True))
        for index, layer in enumerate(self.adapter.decoder_layers):
            hook = self._make_layer_hook(index)
            self._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._request = None

    # --- input hooks ---------------------------------------------------------------------------------
    def _on_outer_input(self, module, args, kwargs):
        if kwargs.get("labels") is not None:
            raise ValueError("vtprune presses are for inference: a forward with `labels` is not supported.")
        return None

    def _on_input(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = _cache_kwarg(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        if input_ids is None:
            raise ValueError(
                "vtprune locates visual tokens from input_ids; pass input_ids (from the processor), "
                "not inputs_embeds, while a press is active."
            )
        request = self._request
        layout = self.adapter.visual_layout(input_ids)
        if sum(layout.num_visual) == 0 and request is not None and cache is request.cache and past > 0:
            request.phase = "decode"  # continuing the cache this session pruned
            request.step = {"past": past}
            return None
        if past > 0:
            if sum(layout.num_visual) == 0:
                self._request = None  # a cache we did not prune: nothing to do
                return None
            raise ValueError(
                "pruning a prompt that continues a non-empty KV cache is not supported: start a new "
                "generate() (or pass a fresh cache) for prompts with images."
            )
        missing = [b for b, n in enumerate(layout.num_visual) if n == 0]
        if missing:
            raise ValueError(
                f"no visual tokens in sample(s) {missing} of the prompt: the image token id "
                f"{getattr(self.adapter, 'image_token_id', '?')} does not occur. Include the image placeholder "
                "(e.g. '<image>') and build inputs with the model's processor, or run text-only prompts "
                "outside the press context."
            )
        if cache is not None:
            from transformers import DynamicCache

            if not isinstance(cache, DynamicCache):
                raise ValueError(
                    f"vtprune needs a DynamicCache (the generate() default) to hold layers of different "
                    f"lengths; got {type(cache).__name__}. Remove cache_implementation=... or pass DynamicCache()."
                )
        self._request = self._new_request(input_ids, kwargs.get("attention_mask"), layout)
        self._request.cache = cache
        return None

    def _new_request(self, input_ids: torch.Tensor, attention_mask, layout: VisualLayout) -> _Request:
        batch, length = input_ids.shape
        device = input_ids.device
        visual_rank0 = torch.full((batch, length), -1, dtype=torch.long, device=device)
        for b, positions in enumerate(layout.positions):
            visual_rank0[b, positions] = torch.arange(positions.numel(), device=device)
        if attention_mask is not None and attention_mask.dim() == 2:
            valid0 = attention_mask.to(device=device).bool()
        else:
            valid0 = torch.ones(batch, length, dtype=torch.bool, device=device)
        padding = [None] * batch
        debias = self.press.debias
        if debias is not None and debias.padding:
            if len(self.image_sizes) != layout.num_images:
                raise ValueError(
                    f"image_sizes has {len(self.image_sizes)} entries but the batch holds {layout.num_images} "
                    "images: pass one (width, height) per image, in prompt order."
                )
            fractions = self.adapter.padding_fractions(layout, self.image_sizes, self.processor)
            padding = [f.to(device) > debias.padding_threshold for f in fractions]
        slots = torch.arange(length, device=device).expand(batch, length)
        return _Request(
            input_len=length,
            layout=layout,
            visual_rank0=visual_rank0,
            valid0=valid0,
            padding=padding,
            slots=slots,
        )

    # --- layer hooks ---------------------------------------------------------------------------------
    def _make_layer_hook(self, index: int):
        first_active = min([stage.layer for stage in self.stages] + [s.score_layer for s in self.stages if s.score_layer is not None])

        def hook(module, args, kwargs):
            request = self._request
            if request is None or index < first_active:
                return None
            if request.phase == "prefill":
                return self._prefill_layer(index, module, request, args, kwargs)
            return self._decode_layer(index, request, args, kwargs)

        return hook

    def _prefill_layer(self, index: int, layer: nn.Module, request: _Request, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if not request.captured:
            request.mask0 = kwargs.get("attention_mask")
            request.position_embeddings0 = kwargs.get("position_embeddings")
            request.position_ids0 = kwargs.get("position_ids")
            request.captured = True
            if request.cache is None:
                request.cache = _cache_kwarg(kwargs)
        current = request.current or {
            "attention_mask": kwargs.get("attention_mask"),
            "position_embeddings": kwargs.get("position_embeddings"),
            "position_ids": kwargs.get("position_ids"),
        }
        for stage_index, stage in enumerate(self.stages):
            if stage.score_layer == index or (stage.score_layer is None and stage.layer == index):
                self._select(stage_index, stage, layer, hidden, current["position_embeddings"], request)
        if index in self.cut_layers:
            stage_index = self.cut_layers.index(index)
            hidden = self._cut(stage_index, hidden, request)
        if request.current is None:
            return None
        new_kwargs = dict(kwargs, **request.current)
        if args:
            return (hidden, *args[1:]), new_kwargs
        new_kwargs["hidden_states"] = hidden
        return args, new_kwargs

    def _select(self, stage_index, stage: Stage, layer, hidden, position_embeddings, request: _Request) -> None:
        """Score the remaining visual tokens, debias, and choose what this stage keeps."""
        slots = request.slots
        rank = torch.where(slots >= 0, torch.gather(request.visual_rank0, 1, slots.clamp(min=0)), -1)
        visual_slots = [torch.nonzero(rank[b] >= 0).flatten() for b in range(slots.shape[0])]
        visual_ranks = [rank[b, s] for b, s in enumerate(visual_slots)]
        key_valid = (slots >= 0) & torch.gather(request.valid0, 1, slots.clamp(min=0))
        ctx = StageContext(
            session=self,
            stage_index=stage_index,
            stage=stage,
            layer=layer,
            hidden_states=hidden,
            position_embeddings=position_embeddings,
            visual_slots=visual_slots,
            visual_ranks=visual_ranks,
            key_valid=key_valid,
            slot_orig=slots,
        )
        scores = self.press.score(ctx)
        debias = self.press.debias
        apply_debias = debias is not None and (debias.stages == "all" or stage_index == 0)
        kept, raw_full, debiased_full = [], [], []
        for b, ranks in enumerate(visual_ranks):
            num_visual = request.layout.num_visual[b]
            sample_scores = scores[b].float()
            if sample_scores.shape != ranks.shape:
                raise RuntimeError(
                    f"{type(self.press).__name__}.score returned {tuple(sample_scores.shape)} scores for sample "
                    f"{b}, expected {tuple(ranks.shape)}"
                )
            keep = resolve_keep(stage.keep, num_visual, int(ranks.numel()))
            ranking = sample_scores
            padding = request.padding[b]
            if apply_debias:
                ranking = debias.apply(
                    sample_scores, ranks, request.layout.segments[b], padding[ranks] if padding is not None else None
                )
                if padding is not None and debias.drop_padding:
                    keep = max(1, min(keep, int((~padding[ranks]).sum())))
            order = _rank_with_padding_last(ranking, padding[ranks] if (apply_debias and padding is not None) else None)
            kept.append(torch.sort(ranks[order[:keep]]).values)
            raw_full.append(_scatter_full(sample_scores, ranks, num_visual))
            debiased_full.append(_scatter_full(ranking, ranks, num_visual) if apply_debias else None)
        request.kept[stage_index] = kept
        request.selections.append(
            StageSelection(
                layer=stage.layer,
                kept=kept,
                num_visual=list(request.layout.num_visual),
                scores=raw_full,
                debiased=debiased_full,
                padding=list(request.padding),
                segments=request.layout.segments,
            )
        )
        if stage_index == len(self.stages) - 1:
            self.press.last_selection = request.selections

    def _cut(self, stage_index: int, hidden: torch.Tensor, request: _Request) -> torch.Tensor:
        """Drop the visual tokens this stage does not keep from `hidden` (B, N_cur, D)."""
        slots = request.slots
        batch = slots.shape[0]
        kept_ranks = request.kept[stage_index]
        keep_slots = []
        for b in range(batch):
            orig = slots[b]
            rank = torch.where(orig >= 0, request.visual_rank0[b, orig.clamp(min=0)], -1)
            is_kept_visual = torch.zeros_like(orig, dtype=torch.bool)
            if rank.ge(0).any():
                is_kept_visual = torch.isin(rank, kept_ranks[b]) & (rank >= 0)
            keep = (orig >= 0) & ((rank < 0) | is_kept_visual)
            keep_slots.append(torch.nonzero(keep).flatten())
        new_len = max(int(k.numel()) for k in keep_slots)
        index = torch.full((batch, new_len), -1, dtype=torch.long, device=slots.device)
        for b, k in enumerate(keep_slots):
            index[b, new_len - k.numel() :] = k  # left-pad
        new_slots = torch.where(index >= 0, torch.gather(slots, 1, index.clamp(min=0)), -1)
        gathered = torch.gather(hidden, 1, index.clamp(min=0)[:, :, None].expand(-1, -1, hidden.shape[-1]))
        hidden = gathered.masked_fill((index < 0)[:, :, None], 0.0)
        request.slots = new_slots
        request.stage_slots.append((self.stages[stage_index].layer, new_slots))
        request.current = {
            "attention_mask": _select_mask(request.mask0, new_slots, new_slots, prefill=True),
            "position_embeddings": tuple(_gather_seq(t, new_slots) for t in request.position_embeddings0),
            "position_ids": _gather_seq(request.position_ids0, new_slots)
            if request.position_ids0 is not None
            else None,
        }
        return hidden

    def _decode_layer(self, index: int, request: _Request, args, kwargs):
        applicable = [i for i, (layer, _) in enumerate(request.stage_slots) if layer <= index]
        if not applicable:
            return None
        stage = applicable[-1]
        hidden = args[0] if args else kwargs["hidden_states"]
        if stage not in request.step:
            request.step[stage] = self._decode_mask(stage, index, request, kwargs.get("attention_mask"), hidden.shape[1])
        return args, dict(kwargs, attention_mask=request.step[stage])

    def _decode_mask(self, stage: int, index: int, request: _Request, mask0, query_len: int):
        """Mask for the new queries of a decode step over what layer `index`'s cache holds."""
        cache = request.cache
        past = request.step["past"]  # layer 0's length before this step: never cut, the original numbering
        _, slots = request.stage_slots[stage]
        cached = cache.layers[index].keys.shape[-2]
        generated = past - request.input_len
        if cached != slots.shape[1] + generated:
            raise RuntimeError(
                f"layer {index} of the KV cache holds {cached} tokens, expected {slots.shape[1] + generated}: "
                "the cache was changed outside vtprune's engine."
            )
        total = past + query_len
        batch = slots.shape[0]
        tail = torch.arange(request.input_len, total, device=slots.device).expand(batch, -1)
        cols = torch.cat([slots, tail], dim=1)
        rows = torch.arange(past, total, device=slots.device).expand(batch, -1)
        return _select_mask(mask0, rows, cols, prefill=False)


# --- helpers -----------------------------------------------------------------------------------------
def _cache_kwarg(kwargs: dict):
    """The KV cache a forward receives: `cache` since transformers 5.24, `past_key_values` before."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _rank_with_padding_last(scores: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """Indices of `scores` (R,) from best to worst; padding tokens (R,) bool always come after real ones."""
    if padding is None:
        return torch.argsort(scores, descending=True, stable=True)
    key = torch.where(padding, float("-inf"), scores)
    return torch.argsort(key, descending=True, stable=True)


def _scatter_full(values: torch.Tensor, ranks: torch.Tensor, num_visual: int) -> torch.Tensor:
    full = torch.full((num_visual,), float("nan"), dtype=torch.float32)
    full[ranks.cpu()] = values.detach().float().cpu()
    return full


def _gather_seq(tensor: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Gather the sequence dimension of cos/sin (b, N, d) or position ids (b, N) / (k, b, N) at `slots`
    (B, M) orig positions; engine padding (-1) takes position 0's values (they are masked anyway)."""
    batch = slots.shape[0]
    index = slots.clamp(min=0)
    if tensor.dim() == 3 and tensor.shape[0] in (1, batch) and tensor.shape[1] != batch:  # (b, N, d)
        expanded = tensor.expand(batch, -1, -1)
        return torch.gather(expanded, 1, index[:, :, None].expand(-1, -1, tensor.shape[-1]))
    if tensor.dim() == 2:  # (b, N)
        return torch.gather(tensor.expand(batch, -1), 1, index)
    if tensor.dim() == 3:  # (k, b, N) multimodal position ids
        expanded = tensor.expand(-1, batch, -1)
        return torch.gather(expanded, 2, index[None].expand(tensor.shape[0], -1, -1))
    raise ValueError(f"unexpected positional tensor shape {tuple(tensor.shape)}")


def _select_mask(mask0, rows: torch.Tensor, cols: torch.Tensor, *, prefill: bool):
    """The model's attention mask restricted to query `rows` and key `cols` (B, R) / (B, C) orig positions
    (-1 = engine padding), in the model's own format.

    mask0 is what the model built for the full sequence: None (sdpa's implicit causal mask), a 4-D bool
    mask (sdpa, True = attend), a 4-D additive float mask (eager), or a 2-D padding mask (flash attention).
    Engine-padding keys are masked; engine-padding queries attend only to themselves (no NaN rows).
    """
    row_pad, col_pad = rows < 0, cols < 0
    if mask0 is None and not bool(col_pad.any()):
        return None  # still plain causal over increasing positions: let the kernel do it
    if mask0 is not None and mask0.dim() == 2:  # flash attention: (B, K) padding mask
        gathered = torch.gather(mask0, 1, cols.clamp(min=0))
        return gathered.masked_fill(col_pad, 0)
    if mask0 is not None and not isinstance(mask0, torch.Tensor):
        raise ValueError(
            f"vtprune cannot cut an attention mask of type {type(mask0).__name__} (flex attention); "
            "load the model with attn_implementation='sdpa' or 'eager'."
        )
    if mask0 is None:
        allowed = cols[:, None, None, :] <= rows[:, None, :, None]  # (B, 1, R, C) causal on orig positions
    else:
        full = mask0.expand(rows.shape[0], -1, -1, -1)
        if prefill:
            full = torch.gather(full, 2, rows.clamp(min=0)[:, None, :, None].expand(-1, full.shape[1], -1, full.shape[3]))
        else:
            full = full[:, :, -rows.shape[1] :]
        gathered = torch.gather(full, 3, cols.clamp(min=0)[:, None, None, :].expand(-1, full.shape[1], full.shape[2], -1))
        allowed = gathered if gathered.dtype == torch.bool else gathered == 0
    allowed = allowed & ~col_pad[:, None, None, :]
    if prefill and bool(row_pad.any()):
        eye = torch.eye(rows.shape[1], dtype=torch.bool, device=rows.device)
        allowed = allowed | (eye[None, None] & row_pad[:, None, :, None])
    if mask0 is None or mask0.dtype == torch.bool:
        return allowed
    return torch.where(allowed, 0.0, torch.finfo(mask0.dtype).min).to(mask0.dtype)
