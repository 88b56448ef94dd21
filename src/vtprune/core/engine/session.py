"""`PruningSession`: attaches a press to a model with hooks, and runs each forward's prefill or decode step
through the engine's parts (see the package docstring)."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...adapters import adapter_for
from ...adapters.geometry import request_image_sizes
from ..context import LayerInput
from ..stages import Stage, validate_stages
from .cache import _cache_kwarg, _CacheCuts
from .records import _Planning
from .request import _image_size, _Request, _RequestSetup, _size_list
from .sequence import _SequenceCuts
from .vision import _VisionSide

if TYPE_CHECKING:
    from ...debias import Debias

#: the session active on each model (its input module), so that a second press on the same model is refused
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, PruningSession] = weakref.WeakKeyDictionary()


class PruningSession(_RequestSetup, _Planning, _SequenceCuts, _CacheCuts, _VisionSide):
    """Context manager returned by `press(model, ...)`: attaches on enter, restores the model on exit.

    dry_run: score and decide every stage (recorded in `press.last_selection`) but cut nothing; the model's
    outputs are those of the unpruned model (calibration and analysis use this).
    """

    def __init__(
        self, press, model: nn.Module, *, processor=None, image_sizes: Sequence | None = None, dry_run: bool = False
    ):
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
        if (
            self.debias is not None
            and self.debias.padding
            and self.adapter.pads_images
            and (processor is None or (image_sizes is None and not self.adapter.sizes_in_inputs))
        ):
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
        if getattr(self.adapter, "rotary_fn", None) is not None:
            self.adapter.standard_rope  # noqa: B018 - a cached property: decided once, here rather than inside a forward
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

    # --- context manager -----------------------------------------------------------------------------
    def __enter__(self) -> PruningSession:
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
        self._seen_input = False
        # the input hook starts a request (host bookkeeping, the layout's one synchronisation): under
        # torch.compile it runs eagerly, so that no guard depends on the session's state between requests
        hook = self.adapter.input_module.register_forward_pre_hook(
            torch.compiler.disable(self._on_input), with_kwargs=True
        )
        self._handles.append(hook)
        self._handles.append(self.adapter.input_module.register_forward_hook(self._on_output))
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
                    raise ValueError(
                        f"{type(self.press).__name__}: the vision tower has {len(layers)} layers, no layer {index}"
                    )
                self._handles.append(
                    layers[index].register_forward_pre_hook(self._make_vision_hook(index), with_kwargs=True)
                )
                self._handles.append(layers[index].register_forward_hook(self._make_vision_output_hook(index)))
        if self.vision_stages and not self.dry_run:
            layers = self.adapter.vision_layers
            tower = self.adapter.vision_tower
            self._handles.append(tower.register_forward_pre_hook(self._on_vision_tower_input))
            self._handles.append(tower.register_forward_hook(self._on_vision_tower_output))
            for stage_index, stage in enumerate(self.vision_stages):
                layer = layers[stage.layer]
                self._handles.append(
                    layer.register_forward_pre_hook(self._make_vision_stage_input(stage.layer), with_kwargs=True)
                )
                self._handles.append(
                    layer.self_attn.register_forward_hook(self._make_vision_attention_hook(stage.layer))
                )
                self._handles.append(layer.register_forward_hook(self._make_vision_stage(stage_index, stage)))
        for index, layer in enumerate(self.adapter.decoder_layers):
            self._handles.append(layer.register_forward_pre_hook(self._make_layer_hook(index), with_kwargs=True))
            if self.adapter.adds_visual_features:
                self._handles.append(layer.register_forward_hook(self._make_addition_hook(index)))
            if index in self.key_layers:
                for module, name in (
                    (self.adapter.key_projection(layer), "projected_keys"),
                    (self.adapter.query_projection(layer), "projected_queries"),
                ):
                    self._handles.append(module.register_forward_hook(self._make_projection_hook(index, name)))
        return self

    def __exit__(self, *exc) -> None:
        if not getattr(self, "_seen_input", True) and exc[0] is None:
            warnings.warn(
                f"{type(self.press).__name__} saw no forward pass of the model while it was attached: nothing was "
                "pruned. If the model was compiled (torch.compile) before the press was attached, its graph ignores "
                "the press's hooks (dynamo does not guard on module hooks): attach the press before the first "
                "compiled call, or call torch._dynamo.reset() after attaching it.",
                UserWarning,
                stacklevel=2,
            )
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._request = None
        self._pending_vision = {}
        if _ACTIVE.get(self.adapter.input_module) is self:
            del _ACTIVE[self.adapter.input_module]

    # --- hooks ---------------------------------------------------------------------------------------
    def _on_outer_input(self, module, args, kwargs):
        if kwargs.get("labels") is not None:
            raise ValueError("vtprune presses are for inference: a forward with `labels` is not supported.")
        return None

    def _on_input(self, module, args, kwargs):
        self._seen_input = True
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
        mask = kwargs.get("attention_mask")
        # whether the batch has padding rides on the layout's one synchronisation, where the adapter reads through
        # `read` (else: assumed padded, the general path)
        smallest = mask.amin(dim=1) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None  # (B,)
        with self.adapter.carrying(smallest):
            layout = self.adapter.visual_layout(input_ids, kwargs)
        unpadded = mask is None or (
            smallest is not None and self.adapter.carried is not None and min(self.adapter.carried) > 0
        )
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
        self._sizes = request_image_sizes(
            self.image_sizes, kwargs.get("image_sizes") if self.adapter.sizes_in_inputs else None, layout
        )
        self._request = self._new_request(input_ids, mask, layout)
        self._request.cache = cache
        self._request.unpadded = unpadded
        tail = self.adapter.carried_tail  # without padding, the tokens after the last image: the instruction
        if unpadded and tail is not None and len(tail) == input_ids.shape[0]:
            self._request.cache_values[("count", "instruction")] = list(tail)
        unread = tuple(kind for kind in self.press.text_counts if ("count", kind) not in self._request.cache_values)
        if unread:
            self._request.count_text(unread)
        for (kind, index), hidden in self._pending_vision.items():  # the images of this request's vision pass
            if hidden.shape[0] != layout.num_images:
                continue  # from another call; not these images
            if kind == "tokens":
                self._request.vision_tokens = hidden
            else:
                (self._request.vision_inputs if kind == "input" else self._request.vision_outputs)[index] = hidden
        self._pending_vision = {}
        return None

    def _on_output(self, module, args, output):
        """Records the request's stages in `press.last_selection` once every stage decided, after the model's
        layers: under torch.compile, the record (kept per thread, run eagerly) breaks the graph there, at the end
        of the prefill, rather than among the decoder layers; decode steps have nothing to record."""
        request = self._request
        if request is not None and request.decided and not request.recorded:
            _record(self.press, request)
        return None

    def _make_layer_hook(self, index: int):
        def hook(module, args, kwargs):
            request = self._request
            if request is None or index < self.first_active:
                return None
            if request.phase == "prefill":
                return self._prefill_layer(index, module, request, args, kwargs)
            return self._decode_layer(index, request, args, kwargs)

        return hook

    def _make_projection_hook(self, index: int, name: str):
        """Keeps a score layer's key (or query) projection output on its recorded input, to score without
        recomputing it."""

        def hook(module, args, output):
            request = self._request
            if request is not None and request.phase == "prefill" and index in request.inputs:
                setattr(request.inputs[index], name, output)
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


@torch.compiler.disable
def _record(press, request: _Request) -> None:
    """`press.last_selection = request.selections`, run eagerly: the record is kept per thread
    (`vtprune.core.selections`), which a compiled graph cannot replay."""
    press.last_selection = request.selections
    request.recorded = True


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
