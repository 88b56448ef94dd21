"""The pruning engine: the only code that cuts sequences.

`PruningSession` attaches a press to a model with forward hooks (removed on exit; the model's modules,
weights and attributes are never modified). Per forward call:

* **Prefill** (the prompt contains visual tokens): the input hook finds the visual tokens (adapter). For each
  stage, at the pre-hook of the layer it cuts before, the press decides (`press.select(ctx)`, from a
  `StageContext` that computes attention lazily from the scoring layer's recorded input and the keys that
  layer projected while it ran). The engine then gathers the kept tokens of the hidden states, writes merged
  values, inserts extra tokens, and from then on hands every later layer the matching rows/columns of the
  model's own attention mask and the RoPE tables and position ids: the original positions, or renumbered
  ones (`positions="compact"`). A stage at layer 0 cuts the language model's input instead (embeddings, 2-D
  mask, position ids), so every decoder layer runs on the shorter sequence. Samples of a batch that keep
  different numbers of tokens are left-padded with masked slots.
* **Decode** (no visual tokens, continuing the cache filled by that prefill): nothing is pruned; layers
  after a cut get the columns of the model's mask that match what their KV cache holds (kept prompt tokens,
  then every generated token), and, with compact positions, generated tokens continue each segment's
  numbering (as the official PyramidDrop/SparseVLM code does).

Index spaces: a *prompt position* is a token's index in the uncut prompt. The *base sequence* is what decoder
layer 0 receives: the prompt, or the prompt after a layer-0 cut. Each token of a request has an *id*: base
tokens have ids 0..base_len-1, tokens inserted later (merged/recycled) get further ids; every id has an
*anchor* (the base token whose row/column of the model's mask and whose position it shares) and a *sub*
order among tokens sharing an anchor. *Slots* are positions in the sequence as it is now; `slots` maps each
slot to its id (-1: padding inserted by the engine).
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from .adapters import adapter_for
from .adapters.base import VisualLayout
from .context import LayerInput, StageContext, VisionStageContext, rows_where
from .geometry import request_image_sizes
from .stages import Kept, Stage, StageSelection, VisionStage, member, resolve_keep, validate_stages

if TYPE_CHECKING:
    from .debias import Debias

#: the session active on each model (its input module), so that a second press on the same model is refused
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, PruningSession]" = weakref.WeakKeyDictionary()


@dataclass
class _Ids:
    """What each token id of a request is; tensors (B, M), M = base tokens + tokens inserted so far.

    prompt: prompt position (inserted tokens: their anchor's); rank: visual rank (-1: text; inserted tokens
    continue after the sample's V_b); position_rank: the original visual rank whose position the token has
    (for the positional trend); valid: a real token; anchor: base index whose mask row/column it shares;
    sub: float64 order among tokens of one anchor (0 = the base token); position: base index whose position id
    and RoPE it takes with original positions.
    """

    prompt: torch.Tensor
    rank: torch.Tensor
    position_rank: torch.Tensor
    valid: torch.Tensor
    anchor: torch.Tensor
    sub: torch.Tensor
    position: torch.Tensor

    @classmethod
    def base(cls, prompt: torch.Tensor, rank: torch.Tensor, valid: torch.Tensor) -> "_Ids":
        batch, length = prompt.shape
        own = torch.arange(length, device=prompt.device).expand(batch, length).clone()
        return cls(prompt=prompt, rank=rank, position_rank=rank.clone(), valid=valid, anchor=own,
                   sub=torch.zeros(batch, length, dtype=torch.float64, device=prompt.device), position=own.clone())

    @property
    def size(self) -> int:
        return self.prompt.shape[1]

    def grow(self, count: int) -> None:
        """Room for `count` more ids per sample (filled as engine padding until set)."""
        def more(t, fill):
            return torch.cat([t, torch.full((t.shape[0], count), fill, dtype=t.dtype, device=t.device)], dim=1)

        self.prompt, self.rank, self.position_rank = more(self.prompt, -1), more(self.rank, -1), more(self.position_rank, -1)
        self.valid, self.anchor, self.sub = more(self.valid, False), more(self.anchor, 0), more(self.sub, 0.0)
        self.position = more(self.position, 0)

    def at(self, name: str, slots: torch.Tensor, fill) -> torch.Tensor:
        """The `name` table at `slots` (B, N) ids; `fill` where the slot is engine padding (-1)."""
        values = torch.gather(getattr(self, name), 1, slots.clamp(min=0))
        return values.masked_fill(slots < 0, fill)


@dataclass
class _Request:
    """Per-request state, rebuilt at every prefill (never shared between requests)."""

    prompt_len: int
    layout: VisualLayout
    valid0: torch.Tensor  # (B, N0) bool: from the 2-D attention mask
    padding: list[torch.Tensor | None]  # per sample (V_b,) bool padding marks, or None
    padding_fractions: list[torch.Tensor | None]  # per sample (V_b,) padded share of each token's pixels, or None
    ids: _Ids
    base_len: int
    slots: torch.Tensor  # (B, N_cur) id of each slot, -1 = engine padding
    next_rank: list[int]  # per sample, the rank the next inserted token gets
    image_span: torch.Tensor | None = None  # (B, 2) prompt positions of each sample's first and last visual token
    state: dict = field(default_factory=dict)  # the press's per-request state
    additions: list | None = None  # per decoder layer, (B, max V + 1, D) features added to visual ranks (deepstack)
    inputs: dict[int, LayerInput] = field(default_factory=dict)  # recorded layer inputs (prefill)
    vision_inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # recorded vision-layer inputs
    vision_outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # and outputs
    vision_tokens: torch.Tensor | None = None  # (N_img, T') vision tokens left by the vision stages
    selections: list[StageSelection] = field(default_factory=list)
    segments: list[dict] = field(default_factory=list)  # after each decoder-layer cut: layer, slots, masks, shift
    cache: object = None
    phase: str = "prefill"
    decided: bool = False  # every stage has decided
    # the language model's input after a layer-0 cut: prompt column of each base token, and tokens dropped
    base_prompt_columns: torch.Tensor | None = None
    base_shift: torch.Tensor | None = None
    base_shift_applies: bool = False  # decode positions continue the cut input's numbering (compact)
    # the model's inputs for the base sequence, captured at decoder layer 0
    mask0: object = None
    position_embeddings0: tuple[torch.Tensor, torch.Tensor] | None = None
    position_ids0: torch.Tensor | None = None
    captured: bool = False
    current: dict | None = None  # what layers after the last cut receive instead of the model's tensors
    step: dict = field(default_factory=dict)  # decode: per-step values


_NEVER_PADS_WARNED: set = set()


def _warn_if_processor_never_pads(adapter, processor) -> None:
    """Warn, once per processor class and settings, when padding debiasing is on but the processor never pads
    (e.g. the center-cropping CLIP processor of converted LLaVA-1.5 checkpoints): it would silently do nothing."""
    from .geometry import no_padding_message

    images = getattr(processor, "image_processor", None) or processor
    key = (type(images).__name__, repr(sorted((k, repr(v)) for k, v in vars(images).items() if k.startswith("do_"))))
    if key in _NEVER_PADS_WARNED:
        return
    try:
        pads = adapter.image_geometry(processor).pads
    except (ValueError, NotImplementedError):
        return  # padding_fractions succeeded, so the adapter reads padding without a standard geometry
    _NEVER_PADS_WARNED.add(key)
    if not pads:
        warnings.warn(no_padding_message(processor), UserWarning, stacklevel=2)


class PruningSession:
    """Context manager returned by `press(model, ...)`: attaches on enter, restores the model on exit.

    dry_run: score and decide every stage (recorded in `press.last_selection`) but cut nothing; the model's
    outputs are those of the unpruned model (calibration and analysis use this).
    """

    def __init__(self, press, model: nn.Module, *, processor=None, image_sizes: Sequence | None = None,
                 dry_run: bool = False):
        self.press = press
        self.model = model
        self.adapter = adapter_for(model)
        self.num_layers = len(self.adapter.decoder_layers)
        self.stages: list[Stage] = validate_stages(press.stages(self.num_layers), self.num_layers, type(press).__name__)
        attention = getattr(self.adapter.language_model.config, "_attn_implementation", None)
        if attention == "flex_attention" and any(stage.layer > 0 for stage in self.stages):
            raise ValueError(
                "vtprune cannot prune inside a model that runs flex attention (its BlockMask cannot be cut): load "
                "the model with attn_implementation='sdpa' (the default) or 'eager', or call "
                "model.set_attn_implementation('sdpa')."
            )
        self.positions = press.positions
        if self.positions not in ("original", "compact"):
            raise ValueError(f"positions={self.positions!r}: use 'original' or 'compact'")
        self.debias: Debias | None = press.resolved_debias()
        if self.debias is not None:
            self.debias = self.debias.for_model(model.config, press.name, press.profile_name)
        _check_profile_method(self.debias, press)
        self.dry_run = bool(dry_run)
        self.processor = processor
        self.image_sizes = None
        if image_sizes is not None:
            self.image_sizes = [_image_size(size, i) for i, size in enumerate(_size_list(image_sizes))]
        self.notes: list[str] = []  # what does not apply to this model family, added to every stage's record
        if self.debias is not None and self.debias.padding and not self.adapter.pads_images:
            self.notes.append(f"padding debiasing does not apply: {self.adapter.no_padding_reason}")
            warnings.warn(self.notes[-1], UserWarning, stacklevel=3)
        if not self.adapter.compact_positions and any(
            (stage.positions or self.positions) == "compact" for stage in self.stages
        ):
            self.notes.append(f"positions='compact' does not apply: {self.adapter.compact_note}")
            warnings.warn(self.notes[-1], UserWarning, stacklevel=3)
        if (self.debias is not None and self.debias.padding and self.adapter.pads_images
                and (processor is None or (image_sizes is None and not self.adapter.sizes_in_inputs))):
            raise ValueError(
                "padding debiasing needs the image geometry: call press(model, processor=processor, "
                "images=[image, ...]) with the PIL images of the batch (or image_sizes=[image.size, ...]), "
                "or turn it off with Debias(padding=False)."
            )
        self._sizes = self.image_sizes  # of the current request (`request_image_sizes`)
        # layers whose input a stage reads, and those whose keys are reused after they ran
        self.record_layers = {s.score_layer for s in self.stages if s.score_layer is not None}
        self.record_layers |= set(press.input_layers())
        self.key_layers = {s.score_layer for s in self.stages if s.score_layer is not None and s.score_layer < s.layer}
        self.first_active = min([s.layer for s in self.stages] + list(self.record_layers))
        self.vision_stages = self._vision_stages()
        self._handles: list = []
        self._request: _Request | None = None
        self._pending_vision: dict = {}
        self._vision_pass: dict = {}

    def _positions(self, stage_index: int) -> str:
        """The position numbering of a stage's cut: its own, or the press's ("original" on families whose
        positions have several axes: there is no compact renumbering of them)."""
        if not self.adapter.compact_positions:
            return "original"
        return self.stages[stage_index].positions or self.positions

    def _vision_stages(self) -> list:
        """The press's vision stages, with layer indices >= 0, checked against the vision tower."""
        try:
            count = len(self.adapter.vision_layers)
        except ValueError:
            count = 0
        declared = self.press.vision_stages(count)
        if declared and not count:
            raise ValueError(f"{type(self.press).__name__} has vision stages but {type(self.adapter).__name__} gives no vision layers")
        stages = [VisionStage(layer=s.layer + count if s.layer < 0 else s.layer, merge=s.merge) for s in declared]
        feature = self.adapter.vision_feature_layer if stages else 0
        for previous, stage in zip([None] + stages[:-1], stages):
            if not 0 <= stage.layer <= feature:
                raise ValueError(
                    f"{type(self.press).__name__}: vision stage at layer {stage.layer}: only layers up to the one the "
                    f"language model's features come from (0..{feature}) reach the language model"
                )
            if previous is not None and stage.layer <= previous.layer:
                raise ValueError(f"{type(self.press).__name__}: vision stage layers must increase")
        if stages and self.stages[0].layer != 0:
            raise ValueError(
                f"{type(self.press).__name__}: with vision stages, the first stage must be at layer 0 (it removes the "
                "tokens the vision tower dropped from the language model's input)"
            )
        return stages

    # --- context manager -----------------------------------------------------------------------------
    def __enter__(self) -> "PruningSession":
        if self._handles:
            raise RuntimeError("this pruning session is already active")
        active = _ACTIVE.get(self.adapter.input_module)
        if active is not None:
            raise RuntimeError(
                f"a press ({type(active.press).__name__}) is already active on this model: presses do not nest. "
                "Leave the first `with` block before entering another, or give one press several stages "
                "(e.g. FastV(layer=[2, 8], keep=[144, 64]))."
            )
        _ACTIVE[self.adapter.input_module] = self
        self.press.last_selection = []
        hook = self.adapter.input_module.register_forward_pre_hook(self._on_input, with_kwargs=True)
        self._handles.append(hook)
        if self.model is not self.adapter.input_module:
            self._handles.append(self.model.register_forward_pre_hook(self._on_outer_input, with_kwargs=True))
        lm = self.adapter.language_model
        if self.stages[0].layer == 0 or self.stages[0].trim_cache or self.adapter.adds_visual_features:
            self._handles.append(lm.register_forward_pre_hook(self._on_language_model_input, with_kwargs=True))
        if self.stages[0].trim_cache and not self.dry_run:
            self._handles.append(lm.register_forward_hook(self._on_language_model_output))
        vision = self.press.vision_layers()
        if vision:
            layers = self.adapter.vision_layers
            for index in sorted({i + len(layers) if i < 0 else i for i in vision}):
                if not 0 <= index < len(layers):
                    raise ValueError(f"{type(self.press).__name__}: the vision tower has {len(layers)} layers, no layer {index}")
                self._handles.append(layers[index].register_forward_pre_hook(self._make_vision_hook(index), with_kwargs=True))
                self._handles.append(layers[index].register_forward_hook(self._make_vision_output_hook(index)))
        if self.vision_stages and not self.dry_run:
            layers = self.adapter.vision_layers
            tower = self.adapter.vision_tower
            self._handles.append(tower.register_forward_pre_hook(self._on_vision_tower_input))
            self._handles.append(tower.register_forward_hook(self._on_vision_tower_output))
            for stage_index, stage in enumerate(self.vision_stages):
                layer = layers[stage.layer]
                self._handles.append(layer.register_forward_pre_hook(self._make_vision_stage_input(stage.layer), with_kwargs=True))
                self._handles.append(layer.self_attn.register_forward_hook(self._make_vision_attention_hook(stage.layer)))
                self._handles.append(layer.register_forward_hook(self._make_vision_stage(stage_index, stage)))
        for index, layer in enumerate(self.adapter.decoder_layers):
            self._handles.append(layer.register_forward_pre_hook(self._make_layer_hook(index), with_kwargs=True))
            if self.adapter.adds_visual_features:
                self._handles.append(layer.register_forward_hook(self._make_addition_hook(index)))
            if index in self.key_layers:
                module = self.adapter.key_projection(layer)
                self._handles.append(module.register_forward_hook(self._make_key_hook(index)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._request = None
        self._pending_vision = {}
        if _ACTIVE.get(self.adapter.input_module) is self:
            del _ACTIVE[self.adapter.input_module]

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
        if request is not None and past > 0 and cache is request.cache:
            # a decode step continuing the cache this session pruned (generated tokens are never pruned, even
            # if a model emits the image token id)
            request.phase = "decode"
            request.step = {"generated": past - request.base_len, "query_len": int(input_ids.shape[1])}
            return None
        layout = self.adapter.visual_layout(input_ids, kwargs)
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
        self._sizes = request_image_sizes(self.image_sizes, kwargs.get("image_sizes") if self.adapter.sizes_in_inputs else None, layout)
        self._request = self._new_request(input_ids, kwargs.get("attention_mask"), layout)
        self._request.cache = cache
        for (kind, index), hidden in self._pending_vision.items():  # the images of this request's vision pass
            if hidden.shape[0] != layout.num_images:
                continue  # from another call; not these images
            if kind == "tokens":
                self._request.vision_tokens = hidden
            else:
                (self._request.vision_inputs if kind == "input" else self._request.vision_outputs)[index] = hidden
        self._pending_vision = {}
        return None

    def _new_request(self, input_ids: torch.Tensor, attention_mask, layout: VisualLayout) -> _Request:
        batch, length = input_ids.shape
        device = input_ids.device
        rank = torch.full((batch, length), -1, dtype=torch.long, device=device)
        for b, positions in enumerate(layout.positions):
            rank[b, positions] = torch.arange(positions.numel(), device=device)
        if attention_mask is not None and attention_mask.dim() == 2:
            valid0 = attention_mask.to(device=device).bool()
        else:
            valid0 = torch.ones(batch, length, dtype=torch.bool, device=device)
        prompt = torch.arange(length, device=device).expand(batch, length).clone()
        fractions = self._padding_fractions(layout, device)
        threshold = self.press.padding_threshold()
        return _Request(
            prompt_len=length,
            layout=layout,
            valid0=valid0,
            padding=[None if f is None else f > threshold for f in fractions],
            padding_fractions=fractions,
            ids=_Ids.base(prompt, rank, valid0.clone()),
            base_len=length,
            slots=prompt.clone(),
            next_rank=list(layout.num_visual),
            image_span=torch.stack([torch.stack([p[0], p[-1]]) for p in layout.positions]),
        )

    def _padding_fractions(self, layout: VisualLayout, device) -> list[torch.Tensor | None]:
        """Per sample (V_b,) padded share of each token's pixels, when the geometry is known (processor and image
        sizes); tokens above the press's padding threshold are padding."""
        batch = len(layout.positions)
        if self._sizes is None or self.processor is None:
            return [None] * batch
        needed = self.debias is not None and self.debias.padding
        if not self.adapter.pads_images:
            return [None] * batch
        if len(self._sizes) != layout.num_images:
            if not needed:
                return [None] * batch
            raise ValueError(
                f"image_sizes has {len(self._sizes)} entries but the batch holds {layout.num_images} "
                "images: pass one (width, height) per image, in prompt order."
            )
        try:
            fractions = self.adapter.padding_fractions(layout, self._sizes, self.processor)
        except ValueError:
            if needed:
                raise
            return [None] * batch  # geometry unknown for this processor; only the record would have used it
        if needed:
            _warn_if_processor_never_pads(self.adapter, self.processor)
        return [f.to(device) for f in fractions]

    # --- stage at the language model's input ---------------------------------------------------------
    def _on_language_model_input(self, module, args, kwargs):
        request = self._request
        if request is None:
            return None
        if request.phase == "decode":
            if request.base_prompt_columns is None:
                return None  # no cut at the language model's input and no trimmed cache
            return self._decode_language_model_input(request, kwargs)
        taken = self._take_visual_additions(request, kwargs)
        if self.stages[0].layer != 0:
            return None if taken is kwargs else (args, taken)
        kwargs = taken
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or args:
            raise RuntimeError("vtprune expected the language model to be called with inputs_embeds= keywords")
        request.inputs[0] = LayerInput(0, self.adapter.decoder_layers[0], embeds, None)
        decisions = self._decide(0, embeds, None, request)
        if self.dry_run:
            return None
        batch, length = request.slots.shape
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(length, device=embeds.device).expand(batch, length)
        new_slots, source = self._apply(decisions, request)
        hidden = _assemble(embeds, source, new_slots, decisions, request.ids)
        ids = request.ids
        valid = ids.at("valid", new_slots, False)
        if self._positions(0) == "compact":
            new_positions = _compact_positions(position_ids, request.valid0, valid)
        else:
            new_positions = _gather_seq(position_ids, ids.at("position", new_slots, 0))
        # the cut sequence becomes the base sequence of every decoder layer
        request.base_prompt_columns = ids.at("prompt", new_slots, -1)
        request.base_shift = request.valid0.sum(1) - valid.sum(1)
        request.base_shift_applies = self._positions(0) == "compact"
        new_len = new_slots.shape[1]
        request.ids = _Ids.base(request.base_prompt_columns, ids.at("rank", new_slots, -1), valid)
        request.ids.position_rank = ids.at("position_rank", new_slots, -1)
        request.slots = torch.arange(new_len, device=embeds.device).expand(batch, new_len).clone()
        request.base_len = new_len
        new_kwargs = dict(kwargs, inputs_embeds=hidden, attention_mask=valid.long(), position_ids=new_positions)
        return args, new_kwargs

    def _take_visual_additions(self, request: _Request, kwargs: dict) -> dict:
        """Families that add features to the visual tokens after their first decoder layers (Qwen3-VL's deepstack):
        the engine takes the additions out of the language model's call and adds them itself after each of those
        layers, to the visual tokens still present (the kept ones, by their original visual rank). Returns the
        keyword arguments the language model is called with (`kwargs` itself when there is nothing to take)."""
        if not self.adapter.adds_visual_features:
            return kwargs
        taken = self.adapter.visual_additions(kwargs)
        if taken is None:
            return kwargs
        new_kwargs, mask, additions = taken
        layout = request.layout
        counts = mask.sum(dim=1).tolist()
        if counts != layout.num_visual or any(
            not torch.equal(torch.nonzero(mask[b]).flatten().to(p.device), p) for b, p in enumerate(layout.positions)
        ):
            raise ValueError(
                f"{type(self.adapter).__name__}: the visual features added inside the decoder belong to "
                f"{counts} tokens per sample, but the prompt's visual tokens are {layout.num_visual}: pass the "
                "image/video inputs the processor returned with these input_ids."
            )
        width = max(layout.num_visual) + 1
        tables = []
        for addition in additions:  # (V_total, D) -> (B, max V + 1, D), the last row zero (no addition)
            table = addition.new_zeros(len(counts), width, addition.shape[-1])
            start = 0
            for b, count in enumerate(counts):
                table[b, :count] = addition[start:start + count]
                start += count
            tables.append(table)
        request.additions = tables
        return new_kwargs

    def _make_addition_hook(self, index: int):
        def hook(module, args, output):
            request = self._request
            if request is None or request.phase != "prefill":
                return None
            tables = request.additions
            if not tables or index >= len(tables):
                return None
            if index == len(tables) - 1:
                request.additions = None  # the last one: free them
            hidden = output[0] if isinstance(output, tuple) else output
            table = tables[index]
            rank = request.ids.at("rank", request.slots, -1)  # original visual rank of each slot (-1: none)
            limit = torch.tensor(request.layout.num_visual, device=rank.device)[:, None]
            row = torch.where((rank >= 0) & (rank < limit), rank, table.shape[1] - 1)
            added = torch.gather(table.to(hidden.device, hidden.dtype), 1, row[:, :, None].expand(-1, -1, table.shape[-1]))
            hidden = hidden + added
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def _on_language_model_output(self, module, args, output):
        """After a prefill whose first stage trims the cache: the layers before that stage keep only the tokens
        it kept, and decoding treats the cut sequence as the language model's input (as after a layer-0 cut)."""
        request = self._request
        if request is None or request.phase != "prefill" or not request.segments or request.cache is None:
            return None
        segment = request.segments[0]
        slots, ids = segment["slots"], request.ids
        if bool((slots >= request.base_len).any()):
            raise ValueError("a stage that trims the cache cannot insert tokens (they have no keys in earlier layers)")
        index = slots.clamp(min=0)
        for layer in range(self.stages[0].layer):  # their cache still holds the base sequence, in order
            cached = request.cache.layers[layer]
            columns = index[:, None, :, None].expand(-1, cached.keys.shape[1], -1, cached.keys.shape[-1])
            cached.keys = torch.gather(cached.keys, 2, columns)
            cached.values = torch.gather(cached.values, 2, columns.expand(-1, -1, -1, cached.values.shape[-1]))
        valid = ids.at("valid", slots, False)
        batch, length = slots.shape
        request.base_prompt_columns = ids.at("prompt", slots, -1)
        # the trimmed layers cached their keys at the prompt's own positions: decode continues those there (no
        # base shift); with compact numbering the layers from the cut on continue the renumbered sequence
        dropped = request.valid0.sum(1) - valid.sum(1)
        inverse = torch.full((batch, ids.size), -1, dtype=torch.long, device=slots.device)
        inverse.scatter_(1, index, torch.arange(length, device=slots.device).expand(batch, length).clone())
        identity = torch.arange(length, device=slots.device).expand(batch, length).clone()
        later = []
        if segment["shift"] is not None:
            later.append(dict(segment, slots=identity, anchor=torch.where(valid, identity, -1),
                              sub=torch.zeros(batch, length, dtype=torch.float64, device=slots.device), shift=dropped))
        for other in request.segments[1:]:  # re-expressed over the trimmed sequence
            anchor = torch.where(other["anchor"] >= 0, torch.gather(inverse, 1, other["anchor"].clamp(min=0)), -1)
            later.append(dict(other, anchor=anchor))
        request.segments = later
        request.ids = _Ids.base(request.base_prompt_columns, ids.at("rank", slots, -1), valid)
        request.base_len = length
        return None

    def _decode_language_model_input(self, request: _Request, kwargs):
        """A decode step after a layer-0 cut: the 2-D mask and positions over what the cache holds."""
        query_len, generated = request.step["query_len"], request.step["generated"]
        batch, device = request.slots.shape[0], request.slots.device
        tail = torch.arange(request.prompt_len, request.prompt_len + generated + query_len, device=device)
        columns = torch.cat([request.base_prompt_columns, tail.expand(batch, -1)], dim=1)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            mask = torch.gather(mask, 1, columns.clamp(min=0)).masked_fill(columns < 0, 0)
        else:
            mask = torch.cat([request.ids.valid[:, : request.base_len].long(),
                              torch.ones(batch, generated + query_len, dtype=torch.long, device=device)], dim=1)
        position_ids = kwargs.get("position_ids")
        if position_ids is None:  # what the unpruned model would have used
            position_ids = (request.prompt_len + generated + torch.arange(query_len, device=device)).expand(batch, -1)
        if request.base_shift_applies:
            position_ids = position_ids - request.base_shift[:, None]
        return (), dict(kwargs, attention_mask=mask, position_ids=position_ids)

    # --- layer hooks ---------------------------------------------------------------------------------
    def _make_layer_hook(self, index: int):
        def hook(module, args, kwargs):
            request = self._request
            if request is None or index < self.first_active:
                return None
            if request.phase == "prefill":
                return self._prefill_layer(index, module, request, args, kwargs)
            return self._decode_layer(index, request, args, kwargs)

        return hook

    def _make_vision_hook(self, index: int):
        # generate() encodes the images before the first forward (mm_encoder_outputs): the vision tower may run
        # before the request exists, so its activations wait in `_pending_vision` for the next prefill
        def hook(module, args, kwargs):
            self._record_vision("input", index, args[0] if args else kwargs["hidden_states"])
            return None

        return hook

    # --- vision stages (inside the vision tower) -----------------------------------------------------------
    def _on_vision_tower_input(self, module, args):
        self._vision_pass = {"tokens": None, "input": {}, "attention": {}, "outputs": {}, "length": None}
        return None

    def _make_vision_stage_input(self, index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            state = self._vision_pass
            if state["tokens"] is None:
                images, length = hidden.shape[:2]
                state["tokens"] = torch.arange(length, device=hidden.device).expand(images, length)
                state["length"] = length
            state["input"][index] = hidden
            return None

        return hook

    def _make_vision_attention_hook(self, index: int):
        def hook(module, args, output):
            self._vision_pass["attention"][index] = output[0] if isinstance(output, tuple) else output
            return None

        return hook

    def _make_vision_stage(self, stage_index: int, stage):
        def hook(module, args, output):
            state = self._vision_pass
            hidden = output[0] if isinstance(output, tuple) else output
            tokens = state["tokens"]
            patches = tokens.shape[1] - int(self.adapter.vision_cls_index is not None)
            merge = round(stage.merge * patches) if isinstance(stage.merge, float) else int(stage.merge)
            if not 0 <= merge < patches:
                raise ValueError(f"vision stage {stage_index}: cannot merge {merge} of {patches} patches")
            vctx = VisionStageContext(
                adapter=self.adapter, stage_index=stage_index, layer=module, merge=merge, tokens=tokens,
                input=state["input"][stage.layer], attention_output=state["attention"][stage.layer], output=hidden,
            )
            keep, values = self.press.select_vision(vctx)
            images, width = hidden.shape[0], hidden.shape[-1]
            if keep.dim() != 2 or keep.shape[0] != images or keep.dtype != torch.long:
                raise RuntimeError(f"{type(self.press).__name__}.select_vision must return (N, T') long token indices")
            new = torch.gather(hidden, 1, keep[:, :, None].expand(-1, -1, width)) if values is None else values.to(hidden.dtype)
            state["tokens"] = torch.gather(tokens, 1, keep)
            state["outputs"][stage.layer] = new  # the model's own output capture may have seen the unmerged one
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    def _on_vision_tower_output(self, module, args, output):
        """Restore every hidden state of the vision tower to the full token count (zeros where tokens left), so the
        model's own feature selection and projector work unchanged; the language model's input loses those
        tokens at the press's layer-0 stage."""
        state = self._vision_pass
        tokens = state.get("tokens") if state else None
        if tokens is None:
            return None

        def restore(hidden):
            if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[1] == state["length"]:
                return hidden
            full = hidden.new_zeros(hidden.shape[0], state["length"], hidden.shape[-1])
            return full.scatter(1, tokens[:, :, None].expand(-1, -1, hidden.shape[-1]), hidden)

        if getattr(output, "hidden_states", None) is not None:
            captured = list(output.hidden_states)
            for layer, merged in state["outputs"].items():  # hidden_states[i + 1] is layer i's output
                if layer + 1 < len(captured) and captured[layer + 1] is not None:
                    captured[layer + 1] = merged
            output.hidden_states = tuple(restore(h) for h in captured)
        if getattr(output, "last_hidden_state", None) is not None:
            output.last_hidden_state = restore(output.last_hidden_state)
        self._record_vision("tokens", -1, tokens)
        self._vision_pass = {}
        return output

    def _record_vision(self, kind: str, index: int, hidden: torch.Tensor) -> None:
        """Into the request being prefilled (the vision tower ran inside its forward), or else kept for the next
        request (generate() encodes the images before its first forward)."""
        request = self._request
        if request is not None and request.phase == "prefill" and not request.decided:
            if kind == "tokens":
                request.vision_tokens = hidden
            else:
                (request.vision_inputs if kind == "input" else request.vision_outputs)[index] = hidden
        else:
            self._pending_vision[(kind, index)] = hidden

    def _make_vision_output_hook(self, index: int):
        def hook(module, args, output):
            self._record_vision("output", index, output[0] if isinstance(output, tuple) else output)
            return None

        return hook

    def _make_key_hook(self, index: int):
        def hook(module, args, output):
            request = self._request
            if request is not None and request.phase == "prefill" and index in request.inputs:
                request.inputs[index].projected_keys = output
            return None

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
        for stage_index, stage in enumerate(self.stages):
            if stage.layer == index and index > 0:
                embeddings = (request.current or kwargs)["position_embeddings"]
                live = LayerInput(index, layer, hidden, embeddings)
                decisions = self._decide(stage_index, hidden, live, request)
                if not self.dry_run:
                    hidden = self._cut(stage_index, hidden, decisions, request)
        if index in self.record_layers:
            embeddings = (request.current or kwargs)["position_embeddings"]
            request.inputs[index] = LayerInput(index, layer, hidden, embeddings)
        if index == self.stages[-1].layer:
            request.inputs, request.vision_inputs, request.vision_outputs = {}, {}, {}  # decided: free them
        if request.current is None:
            return None
        new_kwargs = dict(kwargs, **request.current)
        own_mask = kwargs.get("attention_mask")
        if own_mask is not request.mask0:  # a layer of another attention type (sliding window, ...): its own mask
            new_kwargs["attention_mask"] = self._layer_mask(request, own_mask)
        if args:
            return (hidden, *args[1:]), new_kwargs
        new_kwargs["hidden_states"] = hidden
        return args, new_kwargs

    def _layer_mask(self, request: _Request, mask):
        """The model's mask for a layer whose attention type differs from decoder layer 0's (each type has its
        own full-length mask), restricted to the tokens after the last cut; one selection per mask object."""
        segment = request.segments[-1]
        cached = segment.setdefault("masks", {})
        if id(mask) not in cached:
            anchor, sub = segment["anchor"], segment["sub"]
            cached[id(mask)] = (mask, _select_mask(mask, anchor, sub, anchor, sub, prefill=True))
        return cached[id(mask)][1]

    # --- deciding ------------------------------------------------------------------------------------
    def _context(self, stage_index: int, live: LayerInput | None, request: _Request) -> StageContext:
        stage = self.stages[stage_index]
        slots, ids = request.slots, request.ids
        rank = ids.at("rank", slots, -1)
        visual_slots = rows_where(rank >= 0)
        position_rank = ids.at("position_rank", slots, -1)
        inputs = dict(request.inputs)
        if live is not None:  # the cut layer's input as the stage sees it (before its own cut)
            inputs[stage.layer] = live
        return StageContext(
            adapter=self.adapter,
            stage_index=stage_index,
            stage=stage,
            num_stages=len(self.stages),
            visual_slots=visual_slots,
            visual_ranks=[rank[b, s] for b, s in enumerate(visual_slots)],
            position_ranks=[position_rank[b, s] for b, s in enumerate(visual_slots)],
            slot_visual_rank=rank,
            slot_valid=ids.at("valid", slots, False),
            slot_prompt_position=ids.at("prompt", slots, -1),
            num_visual=list(request.layout.num_visual),
            segments=request.layout.segments,
            image_span=request.image_span,
            inputs=inputs,
            state=request.state,
            vision_inputs=request.vision_inputs,
            vision_outputs=request.vision_outputs,
            vision_tokens=request.vision_tokens,
            debias_config=self.debias,
            debias_active=self.debias is not None and (self.debias.stages == "all" or stage_index == 0),
            padding_marks=list(request.padding),
            padding_fractions=list(request.padding_fractions),
            dry_run=self.dry_run,
            notes=list(self.notes),
        )

    def _decide(self, stage_index: int, hidden: torch.Tensor, live: LayerInput | None, request: _Request) -> list[Kept]:
        """Ask the press for this stage's decision; check it; record it."""
        ctx = self._context(stage_index, live, request)
        owner = type(self.press).__name__
        raw = self.press.select(ctx)
        if len(raw) != ctx.num_samples:
            raise RuntimeError(f"{owner}.select returned {len(raw)} decisions for {ctx.num_samples} samples")
        decisions = [item if isinstance(item, Kept) else Kept(ranks=item) for item in raw]
        _check_decisions(decisions, ctx.visual_ranks, hidden.shape[-1], owner)
        num_visual = request.layout.num_visual

        def full(values, b):
            return None if values is None else _scatter_full(values[b], ctx.visual_ranks[b], num_visual[b])

        request.selections.append(
            StageSelection(
                layer=self.stages[stage_index].layer,
                kept=_original_ranks(decisions, num_visual, request.next_rank),
                num_visual=list(num_visual),
                keep=[resolve_keep(ctx.stage.keep, num_visual[b], len(ctx.visual_ranks[b]), warn=False)
                      for b in range(ctx.num_samples)],
                scores=[full(ctx.recorded_scores, b) for b in range(ctx.num_samples)],
                debiased=[full(ctx.recorded_debiased, b) for b in range(ctx.num_samples)],
                padding=list(request.padding),
                segments=request.layout.segments,
                extra=[d.num_extra for d in decisions],
                notes=list(ctx.notes),
            )
        )
        if stage_index == len(self.stages) - 1:
            self.press.last_selection = request.selections
            request.decided = True
        return decisions

    # --- cutting -------------------------------------------------------------------------------------
    def _apply(self, decisions: list[Kept], request: _Request) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply `decisions` to the current slots. Returns the new slots (B, N_new) of ids (kept tokens in order,
        inserted tokens after their anchors, samples left-padded to one length) and, per new slot, where its row
        comes from (B, N_new): a current slot, N_cur + j for the sample's j-th inserted token, -1 for engine
        padding. Registers the inserted ids. One host synchronisation (the new length)."""
        slots, ids = request.slots, request.ids
        batch, length = slots.shape
        device = slots.device
        rank = ids.at("rank", slots, -1)
        kept_table = torch.zeros(batch, max(request.next_rank) + 1, dtype=torch.bool, device=device)
        for b, decision in enumerate(decisions):
            kept_table[b].scatter_(0, decision.ranks, True)
        keep = (slots >= 0) & ((rank < 0) | torch.gather(kept_table, 1, rank.clamp(min=0)))
        extra = [d.num_extra for d in decisions]
        position = torch.arange(length, device=device, dtype=torch.float64).expand(batch, length)
        order_key = torch.where(keep, position, float("inf"))  # dropped slots sort last
        keys, sources = [order_key], [torch.arange(length, device=device).expand(batch, length)]
        if max(extra):
            width = max(extra)
            first_new = ids.size
            ids.grow(width)
            extra_key = torch.full((batch, width), float("inf"), dtype=torch.float64, device=device)
            for b, decision in enumerate(decisions):
                if decision.num_extra:
                    extra_key[b, : decision.num_extra] = self._register_inserted(b, decision, rank[b], first_new, request)
            keys.append(extra_key)
            sources.append(length + torch.arange(width, device=device).expand(batch, width))
        order_key, source = torch.cat(keys, dim=1), torch.cat(sources, dim=1)
        new_len = int((order_key < float("inf")).sum(dim=1).max())  # the one synchronisation
        order = torch.argsort(order_key, dim=1, stable=True)[:, :new_len]
        present = torch.gather(order_key, 1, order) < float("inf")
        # left-pad: move each row's tokens to the end
        shift = new_len - present.sum(dim=1, keepdim=True)
        column = torch.arange(new_len, device=device).expand(batch, new_len)
        take = (column - shift).clamp(min=0)
        valid = column >= shift
        source = torch.where(valid, torch.gather(torch.gather(source, 1, order), 1, take), -1)
        all_ids = torch.cat([slots, first_new + torch.arange(max(extra), device=device).expand(batch, -1)], 1) if max(extra) else slots
        new_slots = torch.where(valid, torch.gather(all_ids, 1, source.clamp(min=0)), -1)
        return new_slots, source

    def _register_inserted(self, b: int, decision: Kept, slot_rank: torch.Tensor, first_new: int,
                           request: _Request) -> torch.Tensor:
        """Fill the id tables of sample b's inserted tokens; return their sequence order keys (m,) float64."""
        ids, slots = request.ids, request.slots
        count, device = decision.num_extra, slots.device
        anchor_slots = _slots_of_ranks(slot_rank, decision.anchors())
        source_slots = _slots_of_ranks(slot_rank, decision.position_sources())
        anchor_ids, source_ids = slots[b, anchor_slots], slots[b, source_slots]
        # tokens on the same side of the same anchor keep their order: fractions (j + 1) / (n + 1) in their group
        before = decision.before()
        same = (anchor_slots[None, :] == anchor_slots[:, None]) & (before[None, :] == before[:, None])
        earlier = torch.tril(same, diagonal=-1).sum(dim=1).double()
        within = (earlier + 1) / (same.sum(dim=1).double() + 1)
        new = first_new + torch.arange(count, device=device)
        ids.prompt[b, new] = ids.prompt[b, anchor_ids]
        ids.rank[b, new] = request.next_rank[b] + torch.arange(count, device=device)
        request.next_rank[b] += count
        ids.position_rank[b, new] = ids.position_rank[b, source_ids]
        ids.valid[b].index_fill_(0, new, True)  # (a Python-scalar index_put would synchronise)
        ids.anchor[b, new] = ids.anchor[b, anchor_ids]
        after_sub = ids.sub[b, anchor_ids] + within * _sub_gap(ids, b, anchor_ids, above=True)
        before_sub = ids.sub[b, anchor_ids] - (1 - within) * _sub_gap(ids, b, anchor_ids, above=False)
        ids.sub[b, new] = torch.where(before, before_sub, after_sub)
        ids.position[b, new] = ids.position[b, source_ids]
        return torch.where(before, anchor_slots.double() - 1 + within, anchor_slots.double() + within)

    def _cut(self, stage_index: int, hidden: torch.Tensor, decisions: list[Kept], request: _Request) -> torch.Tensor:
        """Apply this stage's decisions to `hidden` (B, N_cur, D) and rebuild what later layers receive."""
        new_slots, source = self._apply(decisions, request)
        hidden = _assemble(hidden, source, new_slots, decisions, request.ids)
        request.slots = new_slots
        ids = request.ids
        anchor, sub = ids.at("anchor", new_slots, -1), ids.at("sub", new_slots, 0.0)
        valid = ids.at("valid", new_slots, False)
        shift = None
        if self._positions(stage_index) == "compact":
            base_valid = ids.valid[:, : request.base_len]
            position_ids = _compact_positions(request.position_ids0, base_valid, valid)
            position_embeddings = self.adapter.position_embeddings(hidden, position_ids)
            shift = base_valid.sum(1) - valid.sum(1)
        else:
            source = ids.at("position", new_slots, -1)
            position_ids = _gather_seq(request.position_ids0, source) if request.position_ids0 is not None else None
            position_embeddings = tuple(_gather_seq(t, source) for t in request.position_embeddings0)
        request.segments.append({"layer": self.stages[stage_index].layer, "slots": new_slots, "anchor": anchor,
                                 "sub": sub, "shift": shift})
        request.current = {
            "attention_mask": _select_mask(request.mask0, anchor, sub, anchor, sub, prefill=True),
            "position_embeddings": position_embeddings,
            "position_ids": position_ids,
        }
        return hidden

    # --- decoding ------------------------------------------------------------------------------------
    def _decode_layer(self, index: int, request: _Request, args, kwargs):
        applicable = [i for i, segment in enumerate(request.segments) if segment["layer"] <= index]
        if not applicable:
            return None
        segment_index = applicable[-1]
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = kwargs.get("attention_mask")
        key = (segment_index, id(mask))  # layers of different attention types have different masks
        if key not in request.step:
            request.step[key] = self._decode_inputs(segment_index, index, request, kwargs, hidden)
        return args, dict(kwargs, **request.step[key])

    def _decode_inputs(self, segment_index: int, index: int, request: _Request, kwargs, hidden) -> dict:
        """Mask (and, with compact positions, positions and RoPE tables) for the new queries of a decode step
        over what layer `index`'s cache holds."""
        segment = request.segments[segment_index]
        generated, query_len = request.step["generated"], hidden.shape[1]
        slots = segment["slots"]
        cached = request.cache.layers[index].keys.shape[-2]
        if cached != slots.shape[1] + generated:
            raise RuntimeError(
                f"layer {index} of the KV cache holds {cached} tokens, expected {slots.shape[1] + generated}: "
                "the cache was changed outside vtprune's engine."
            )
        batch, device = slots.shape[0], slots.device
        tail = torch.arange(request.base_len, request.base_len + generated + query_len, device=device).expand(batch, -1)
        cols = torch.cat([segment["anchor"], tail], dim=1)
        col_sub = torch.cat([segment["sub"], torch.zeros(tail.shape, dtype=torch.float64, device=device)], dim=1)
        rows = tail[:, tail.shape[1] - query_len:]
        row_sub = torch.zeros(rows.shape, dtype=torch.float64, device=device)
        out = {"attention_mask": _select_mask(kwargs.get("attention_mask"), rows, row_sub, cols, col_sub, prefill=False)}
        if segment["shift"] is not None:  # compact: continue the segment's own numbering
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                position_ids = (request.base_len + generated + torch.arange(query_len, device=device)).expand(batch, -1)
            position_ids = position_ids - segment["shift"][:, None]
            out["position_ids"] = position_ids
            out["position_embeddings"] = self.adapter.position_embeddings(hidden, position_ids)
        return out


# --- helpers -----------------------------------------------------------------------------------------
def _size_list(image_sizes) -> list:
    """`image_sizes` as a list of per-image sizes; a bare (width, height) or a number is a clear error."""
    example = "e.g. image_sizes=[image.size] for one image, [a.size, b.size] for two"
    try:
        sizes = list(image_sizes)
    except TypeError:
        raise ValueError(f"image_sizes={image_sizes!r}: give a list with one (width, height) per image, {example}") from None
    if sizes and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sizes):
        raise ValueError(
            f"image_sizes={image_sizes!r} is a list of numbers: give one (width, height) pair per image, {example}"
        )
    return sizes


def _image_size(size, index: int) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(
            f"image_sizes[{index}]={size!r}: give the original (width, height) of each image, e.g. image.size"
        ) from None
    if width <= 0 or height <= 0:
        raise ValueError(f"image_sizes[{index}]={size!r}: width and height must be positive")
    return width, height


def _check_profile_method(debias, press) -> None:
    """Warn when a positional profile was calibrated for another method (its trend belongs to other scores)."""
    profile = None if debias is None else debias.loaded_profile
    names = {getattr(press, "name", None), getattr(press, "profile_name", None)} - {None}
    if profile is not None and profile.method and names and profile.method not in names:
        warnings.warn(
            f"positional profile {profile.name!r} was calibrated for method {profile.method!r}, but the press is "
            f"{type(press).__name__}: its trend may not match this method's scores. Use the method's own profile "
            f"(e.g. 'llava-1.5-7b/{getattr(press, 'profile_name', None) or press.name}') or calibrate one.",
            UserWarning,
            stacklevel=4,
        )


def _cache_kwarg(kwargs: dict):
    """The KV cache a forward receives: `cache` since transformers 5.24, `past_key_values` before."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _check_decisions(decisions: list[Kept], present: list[torch.Tensor], width: int, owner: str) -> None:
    """Shapes are checked on the host; the values of every sample with one device synchronisation."""
    checks, messages = [], []
    for b, decision in enumerate(decisions):
        ranks = decision.ranks
        if not isinstance(ranks, torch.Tensor) or ranks.dtype != torch.long or ranks.dim() != 1:
            raise RuntimeError(f"{owner}: kept ranks of sample {b} must be a 1-D long tensor")
        if ranks.numel() == 0:
            raise RuntimeError(f"{owner}: sample {b} keeps no visual token")
        if decision.values is not None and tuple(decision.values.shape) != (ranks.numel(), width):
            raise RuntimeError(f"{owner}: values of sample {b} must have shape ({ranks.numel()}, {width})")
        checks += [(ranks[1:] > ranks[:-1]).all(), member(ranks, present[b]).all()]
        messages += [f"kept ranks of sample {b} must be sorted and unique",
                     f"sample {b} keeps visual ranks that are not present at this stage"]
        if decision.extra is not None:
            if decision.extra.dim() != 2 or decision.extra.shape[1] != width:
                raise RuntimeError(f"{owner}: extra tokens of sample {b} must have shape (m, {width})")
            checks += [member(decision.anchors(), ranks).all(), member(decision.position_sources(), present[b]).all()]
            messages += [f"extra tokens of sample {b} must follow kept visual tokens",
                         f"extra tokens of sample {b} take positions of tokens not present"]
    for ok, message in zip(torch.stack(checks).tolist(), messages):  # the one synchronisation
        if not ok:
            raise RuntimeError(f"{owner}: {message}")


def _original_ranks(decisions: list[Kept], num_visual: list[int], next_rank: list[int]) -> list[torch.Tensor]:
    """Per sample, the kept ranks that are original visual tokens (inserted tokens have ranks >= V_b and sort
    last); one synchronisation, only when some sample has inserted tokens."""
    if next_rank == list(num_visual):
        return [d.ranks for d in decisions]
    counts = torch.stack([(d.ranks < v).sum() for d, v in zip(decisions, num_visual)]).tolist()
    return [d.ranks[:count] for d, count in zip(decisions, counts)]


def _slots_of_ranks(slot_rank: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """(m,) slots holding each of `ranks`, given the rank of every slot (N,) (-1: not visual)."""
    match = slot_rank[None, :] == ranks[:, None]  # (m, N)
    return match.long().argmax(dim=1)


def _sub_gap(ids: _Ids, b: int, anchor_ids: torch.Tensor, above: bool = True) -> torch.Tensor:
    """(m,) room between each anchor token's sub order and the next sub order among tokens of its anchor, above
    it (tokens inserted after) or below it (before)."""
    base, own = ids.anchor[b, anchor_ids], ids.sub[b, anchor_ids]  # (m,)
    subs = ids.sub[b][None, :]
    same = (ids.anchor[b][None, :] == base[:, None]) & ids.valid[b][None, :]
    if above:
        nearest = torch.where(same & (subs > own[:, None]), subs, float("inf")).min(dim=1).values
        return torch.where(torch.isinf(nearest), 1.0, nearest - own)
    nearest = torch.where(same & (subs < own[:, None]), subs, float("-inf")).max(dim=1).values
    return torch.where(torch.isinf(nearest), 1.0, own - nearest)


def _assemble(hidden: torch.Tensor, source: torch.Tensor, new_slots: torch.Tensor, decisions: list[Kept], ids: _Ids) -> torch.Tensor:
    """The hidden states (B, N_new, D) of `new_slots`: rows of `hidden` (B, N, D) or of the inserted tokens as
    `source` says (engine padding 0), merged values written into the kept visual tokens. No host sync."""
    batch, length, width = hidden.shape
    extra = max(d.num_extra for d in decisions)
    rows = hidden
    if extra:
        inserted = hidden.new_zeros(batch, extra, width)
        for b, decision in enumerate(decisions):
            if decision.num_extra:
                inserted[b, : decision.num_extra] = decision.extra.to(hidden.dtype)
        rows = torch.cat([hidden, inserted], dim=1)
    out = torch.gather(rows, 1, source.clamp(min=0)[:, :, None].expand(-1, -1, width))
    out = out.masked_fill((source < 0)[:, :, None], 0.0)
    if any(d.values is not None for d in decisions):
        new_rank = ids.at("rank", new_slots, -1)
        for b, decision in enumerate(decisions):
            if decision.values is None:
                continue
            index = torch.searchsorted(decision.ranks, new_rank[b]).clamp(max=len(decision.ranks) - 1)
            target = (decision.ranks[index] == new_rank[b]) & (source[b] >= 0) & (source[b] < length)
            out[b] = torch.where(target[:, None], decision.values.to(out.dtype)[index], out[b])
    return out


def _compact_positions(position_ids0: torch.Tensor | None, base_valid: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, N_new) renumbered positions: each sample's real tokens count up from its first real position."""
    batch = valid.shape[0]
    if position_ids0 is None:
        start = torch.zeros(batch, dtype=torch.long, device=valid.device)
    else:
        first = base_valid.long().argmax(dim=1)
        start = torch.gather(position_ids0.expand(batch, -1), 1, first[:, None]).flatten()
    return torch.where(valid, start[:, None] + valid.long().cumsum(1) - 1, 0)


def _scatter_full(values: torch.Tensor, ranks: torch.Tensor, num_visual: int) -> torch.Tensor:
    """(V,) float32 record of per-token values over the original visual ranks, on the values' device (nan:
    absent; values of inserted tokens, ranks >= V, are not recorded)."""
    full = torch.full((num_visual + 1,), float("nan"), dtype=torch.float32, device=values.device)
    index = torch.where(ranks < num_visual, ranks, num_visual)  # inserted tokens land in a dropped extra slot
    full[index] = values.detach().float()
    return full[:num_visual]


def _gather_seq(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather the sequence dimension of cos/sin (b, N, d) or position ids (b, N) / (k, b, N) at `index`
    (B, M) base positions; -1 (engine padding) takes position 0's values (they are masked anyway)."""
    batch = index.shape[0]
    index = index.clamp(min=0)
    if tensor.dim() == 3 and tensor.shape[0] in (1, batch) and tensor.shape[1] != batch:  # (b, N, d)
        expanded = tensor.expand(batch, -1, -1)
        return torch.gather(expanded, 1, index[:, :, None].expand(-1, -1, tensor.shape[-1]))
    if tensor.dim() == 2:  # (b, N)
        return torch.gather(tensor.expand(batch, -1), 1, index)
    if tensor.dim() == 3:  # (k, b, N) multimodal position ids
        expanded = tensor.expand(-1, batch, -1)
        return torch.gather(expanded, 2, index[None].expand(tensor.shape[0], -1, -1))
    raise ValueError(f"unexpected positional tensor shape {tuple(tensor.shape)}")


def _select_mask(mask0, rows: torch.Tensor, row_sub: torch.Tensor, cols: torch.Tensor, col_sub: torch.Tensor, *,
                 prefill: bool):
    """The model's attention mask restricted to query `rows` and key `cols` (B, R) / (B, C) base positions
    (-1 = engine padding), in the model's own format. Tokens sharing a base position (inserted tokens and
    their anchor) are ordered causally by their sub order.

    mask0 is what the model built for the full sequence: None (sdpa's implicit causal mask), a 4-D bool
    mask (sdpa, True = attend), a 4-D additive float mask (eager), or a 2-D padding mask (flash attention).
    Engine-padding keys are masked; engine-padding queries attend only to themselves (no NaN rows).
    """
    row_pad, col_pad = rows < 0, cols < 0
    any_row_pad, any_col_pad, inserted = torch.stack(
        [row_pad.any(), col_pad.any(), (row_sub != 0).any() | (col_sub != 0).any()]
    ).tolist()  # one synchronisation
    if mask0 is None and not any_col_pad:
        return None  # plain causal over the current order (inserted tokens sit in order): let the kernel do it
    if mask0 is not None and not isinstance(mask0, torch.Tensor):
        raise ValueError(
            f"vtprune cannot cut an attention mask of type {type(mask0).__name__} (flex attention); "
            "load the model with attn_implementation='sdpa' or 'eager'."
        )
    if mask0 is not None and mask0.dim() == 2:  # flash attention: (B, K) padding mask
        if inserted:
            raise ValueError("inserted tokens need a 4-D attention mask: use attn_implementation='sdpa' or 'eager'")
        gathered = torch.gather(mask0, 1, cols.clamp(min=0))
        return gathered.masked_fill(col_pad, 0)
    if mask0 is None:
        allowed = cols[:, None, None, :] <= rows[:, None, :, None]  # (B, 1, R, C) causal on base positions
    else:
        full = mask0.expand(rows.shape[0], -1, -1, -1)
        if prefill:
            full = torch.gather(full, 2, rows.clamp(min=0)[:, None, :, None].expand(-1, full.shape[1], -1, full.shape[3]))
        else:
            full = full[:, :, -rows.shape[1]:]
        gathered = torch.gather(full, 3, cols.clamp(min=0)[:, None, None, :].expand(-1, full.shape[1], full.shape[2], -1))
        allowed = gathered if gathered.dtype == torch.bool else gathered == 0
    if inserted:  # same base position: the later sub order does not see the earlier... the earlier does not see the later
        same = rows[:, None, :, None] == cols[:, None, None, :]
        allowed = allowed & ~(same & (col_sub[:, None, None, :] > row_sub[:, None, :, None]))
    allowed = allowed & ~col_pad[:, None, None, :]
    if prefill and any_row_pad:
        eye = torch.eye(rows.shape[1], dtype=torch.bool, device=rows.device)
        allowed = allowed | (eye[None, None] & row_pad[:, None, :, None])
    if mask0 is None or mask0.dtype == torch.bool:
        return allowed
    return torch.where(allowed, 0.0, torch.finfo(mask0.dtype).min).to(mask0.dtype)
