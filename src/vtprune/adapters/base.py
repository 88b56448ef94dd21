"""What the engine needs to know about a model family, and nothing else.

An adapter answers: which modules are the decoder layers, where the visual tokens sit in a prompt (and how
they group into images with a patch grid), which of them are padding, and how the family applies RoPE.
Methods and the engine never look at model classes directly.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class VisualSegment:
    """The visual tokens of one image inside one sample.

    `offset` is the index of the segment's first token among the sample's visual tokens (not the sequence),
    `length` its number of tokens, `grid` its (rows, cols) patch grid in row-major order, `image_index` the
    index of the image in the batch's flattened image list (the order of `image_sizes`), or, for a video
    frame, the index of its video in the batch's flattened video list.
    `kind`: "image", "frame" (one frame, or one temporal group of frames, of a video) or "tile" (an anyres
    crop or the base image of a LLaVA-NeXT-style image). `frame`: the frame's index inside its video (0 for
    images). `part`: the index of the image or video the segment belongs to among the sample's images and
    videos (segments of one image's tiles or one video's frames share it; positional debiasing along the
    whole visual sequence of a video uses it).
    """

    offset: int
    length: int
    grid: tuple[int, int]
    image_index: int
    kind: str = "image"
    frame: int = 0
    part: int = -1


class VisualLayout:
    """Where the visual tokens of each sample of a batch are.

    positions[b]: (V_b,) long, sorted sequence positions of sample b's visual tokens.
    segments[b]: the images of sample b, in order; their lengths add up to V_b.
    mask: (B, N) bool, the visual positions (the batched form; an adapter gives `positions` or `mask` and
        `counts`, the other is built when first read).
    """

    def __init__(
        self,
        positions: list[torch.Tensor] | None = None,
        segments: list[list[VisualSegment]] | None = None,
        *,
        mask: torch.Tensor | None = None,
        counts: list[int] | None = None,
    ):
        if positions is None and (mask is None or counts is None):
            raise ValueError("VisualLayout needs positions, or mask and counts")
        self._positions, self.segments, self._mask, self._counts = positions, segments or [], mask, counts

    @property
    def positions(self) -> list[torch.Tensor]:
        if self._positions is None:
            order = torch.argsort((~self._mask).to(torch.int8), dim=1, stable=True)
            self._positions = [order[b, :count] for b, count in enumerate(self._counts)]
        return self._positions

    def visual_mask(self, length: int, device) -> torch.Tensor:
        """(B, N) bool, the visual positions."""
        if self._mask is None:
            padded = torch.nn.utils.rnn.pad_sequence(list(self.positions), batch_first=True, padding_value=length)
            mask = torch.zeros(len(self.positions), length + 1, dtype=torch.bool, device=device)
            self._mask = mask.scatter_(1, padded.to(device), True)[:, :length]
        return self._mask

    @property
    def num_visual(self) -> list[int]:
        if self._counts is None:
            self._counts = [int(p.numel()) for p in self.positions]
        return self._counts

    @property
    def num_images(self) -> int:
        """Images in the batch (an image's several segments, e.g. LLaVA-NeXT's base and tiles, count once; video
        frames do not count)."""
        return len({seg.image_index for sample in self.segments for seg in sample if seg.kind != "frame"})


_ROTATE_HALF: dict = {}


def _rotate_half_tables(dim: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The permutation (dim,) long and sign (dim,) of rotate_half (cat(-x2, x1)), made once per device and dtype."""
    key = (dim, str(device), dtype)
    if key not in _ROTATE_HALF:
        half = dim // 2
        perm = torch.cat([torch.arange(half, dim), torch.arange(half)]).to(device)
        sign = torch.cat([-torch.ones(half), torch.ones(dim - half)]).to(device=device, dtype=dtype)
        _ROTATE_HALF[key] = (perm, sign)
    return _ROTATE_HALF[key]


class ModelAdapter:
    """Base class: one subclass per model family. See `vtprune.adapters.adapter_for`."""

    #: transformers class names this adapter accepts
    model_classes: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        #: the family's base model (`model.model` of a `...ForConditionalGeneration`, or the base model itself)
        self.base = model.model if hasattr(model, "lm_head") else model

    # --- modules (the defaults fit every Hugging Face VLM whose base model has a `language_model`) ------------
    @property
    def input_module(self) -> nn.Module:
        """The module whose forward receives `input_ids`, `attention_mask` and the KV cache."""
        return self.base

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def language_model(self) -> nn.Module:
        """The decoder stack (its forward receives `inputs_embeds`, the 2-D mask and position ids)."""
        return self.base.language_model

    # --- visual tokens -------------------------------------------------------------------------------
    def visual_layout(self, input_ids: torch.Tensor, inputs: dict | None = None) -> VisualLayout:
        """Find the visual tokens of each sample of `input_ids` (B, N). `inputs`: the other keyword arguments of
        the input module's forward (grid tensors such as `image_grid_thw`, `image_sizes`), for families whose
        token count per image depends on them."""
        raise NotImplementedError

    _facts: torch.Tensor | None = None
    carried: list[int] | None = None  # the values of the facts the last `carrying` block read
    #: per sample, the tokens after its last visual token, read with the facts of the last `carrying` block where
    #: the adapter's `read` had the visual mask (the instruction's length when the batch has no padding), else None
    carried_tail: list[int] | None = None

    @contextmanager
    def carrying(self, facts: torch.Tensor | None):
        """While active, `read` brings `facts` (F,) (bool or integer, on the values' device) to the host in the same
        transfer and leaves them in `carried` (None after the block if the layout was found without `read`)."""
        self._facts, self.carried, self.carried_tail = facts, None, None
        try:
            yield
        finally:
            self._facts = None

    def read(self, values: torch.Tensor, last_visual: torch.Tensor | None = None, length: int = 0) -> list:
        """`values.tolist()` for (B,) or (B, C) integer values: the layout's one host synchronisation, carrying the
        engine's request facts (`carrying`) in the same transfer, and with `last_visual` (B,) long, each sample's
        last visual position in its `length` tokens (where the layout's visual tokens are exactly the ones counted),
        the tokens after it (`carried_tail`)."""
        facts, self._facts = self._facts, None
        if facts is None:
            return values.tolist()
        parts = [values if values.dim() == 1 else values.reshape(-1), facts.to(values.dtype)]
        if last_visual is not None:
            parts.append(last_visual.to(values.dtype))
        flat = torch.cat(parts).tolist()
        count, carried = values.numel(), values.numel() + facts.numel()
        self.carried = flat[count:carried]
        if last_visual is not None:
            self.carried_tail = [length - 1 - last for last in flat[carried:]]
        if values.dim() == 1:
            return flat[:count]
        width = values.shape[1]
        return [flat[i : i + width] for i in range(0, count, width)]

    #: whether images are padded onto the model's grid (pad-to-square, anyres unpadding): where False, padding
    #: debiasing does not apply and reports so (`no_padding_reason`) instead of needing the image geometry
    pads_images: bool = True
    no_padding_reason: str = ""
    #: whether the processor puts each image's original size in the model's inputs (`image_sizes`, (height,
    #: width) rows): then the padding geometry reads them there, and sizes the caller gives are checked against them
    sizes_in_inputs: bool = False

    #: whether positions are one number per token, so that `positions="compact"` can renumber them; families
    #: with multi-axis positions (mRoPE) keep each kept token's own positions and say so (`compact_note`)
    compact_positions: bool = True
    compact_note: str = ""

    #: why vision-side methods (those reading the vision tower: VisionZip, FasterVLM, iLLaVA's vision stages)
    #: cannot run on this family, or "" when they can
    vision_side_unsupported: str = ""

    def image_geometry(self, processor):
        """The `geometry.ImageGeometry` that maps an original image onto this model's patch grid."""
        raise NotImplementedError

    def padding_fractions(self, layout: VisualLayout, image_sizes, processor) -> list[torch.Tensor]:
        """Per sample, (V_b,) float in [0, 1]: share of each visual token's pixels that are padding."""
        raise NotImplementedError

    #: whether the language model adds per-token features to the visual tokens' hidden states after some of its
    #: decoder layers (Qwen3-VL's deepstack): the engine then takes them over (`visual_additions`) so that they
    #: follow the kept tokens
    adds_visual_features: bool = False

    def visual_additions(self, kwargs: dict) -> tuple[dict, torch.Tensor, list[torch.Tensor]] | None:
        """For families that add features to the visual tokens inside the decoder: from the language model's
        forward keyword arguments, return (the keyword arguments without those additions, the (B, N) bool mask of
        the tokens they belong to, one (V_total, D) tensor per decoder layer from layer 0, rows in the order of
        the mask's True entries over (batch, sequence)); the tensor of layer i is added to the output of decoder
        layer i. None when the call carries no additions."""
        return None

    # --- vision tower -----------------------------------------------------------------------------------
    @property
    def vision_layers(self) -> nn.ModuleList:
        """The vision tower's encoder layers (vision-side scores read their inputs)."""
        raise ValueError(f"{type(self).__name__} gives no access to its vision tower's layers")

    @property
    def vision_tower(self) -> nn.Module:
        raise ValueError(f"{type(self).__name__} gives no access to its vision tower")

    @property
    def vision_feature_layer(self) -> int:
        """Index (>= 0) of the vision layer whose output the language model's visual tokens come from."""
        raise ValueError(f"{type(self).__name__} does not say which vision layer feeds the language model")

    def vision_block_tail(self, layer: nn.Module, residual: torch.Tensor) -> torch.Tensor:
        """The rest of a pre-norm vision block after its attention: residual + MLP(norm2(residual))."""
        return residual + layer.mlp(layer.layer_norm2(residual))

    def project_visual(self, features: torch.Tensor) -> torch.Tensor:
        """The family's projector from vision-tower features (..., D_vision) to language-model embeddings."""
        raise ValueError(f"{type(self).__name__} does not expose its projector")

    #: where the patch tokens sit in the vision tower's sequence: (index of the [CLS] token or None, first patch)
    vision_cls_index: int | None = 0
    vision_first_patch: int = 1

    def vision_attention(
        self, layer: nn.Module, hidden_states: torch.Tensor, query_index: torch.Tensor | slice
    ) -> torch.Tensor:
        """(N, H, Q, T) float32 attention probabilities of vision-tower `layer` for the query rows `query_index`
        (Q,) (or a slice of rows) of every image, from the layer's input `hidden_states` (N, T, D) (pre-norm ViT layers: layer_norm1,
        biased q/k projections, no mask, softmax over all T tokens)."""
        attn = layer.self_attn
        normed = layer.layer_norm1(hidden_states)
        images, length, _ = normed.shape
        head_dim = attn.head_dim
        rows = normed[:, query_index]
        queries = attn.q_proj(rows).view(images, rows.shape[1], -1, head_dim).transpose(1, 2)
        keys = attn.k_proj(normed).view(images, length, -1, head_dim).transpose(1, 2)
        logits = torch.matmul(queries.float(), keys.float().transpose(-1, -2)) * attn.scale
        return torch.softmax(logits, dim=-1)

    # --- attention -----------------------------------------------------------------------------------
    rotary_fn: Callable  # (q, k, cos, sin) -> (q, k), the family's own RoPE

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Apply the family's RoPE to x (B, H, N, D) with cos/sin (B, N, D): the standard rotate-half formula
        where `standard_rope` found the family's function to be it (half the ops: the family's function rotates
        a query and a key tensor), else the family's function."""
        if self.standard_rope:  # rotate_half(x) = x[..., perm] * sign (exactly), the sign folded into sin
            perm, sign = _rotate_half_tables(x.shape[-1], x.device, sin.dtype)
            return x * cos[:, None] + x.index_select(-1, perm) * (sin * sign)[:, None]
        rotated, _ = self.rotary_fn(x, x, cos, sin)
        return rotated

    @property
    def standard_rope(self) -> bool:
        """Whether the family's RoPE function is the standard rotate-half one (checked once, on small random
        tensors on the CPU)."""
        if not hasattr(self, "_standard_rope"):
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(1, 2, 3, 8, generator=generator, dtype=torch.float64)
            cos, sin = torch.randn(2, 1, 3, 8, generator=generator, dtype=torch.float64)
            try:
                expected, _ = self.rotary_fn(x, x, cos, sin)
                own = x * cos[:, None] + torch.cat((-x[..., 4:], x[..., :4]), dim=-1) * sin[:, None]
                self._standard_rope = bool(torch.equal(expected, own))
            except Exception:  # a family function with another signature (e.g. multimodal sections)
                self._standard_rope = False
        return self._standard_rope

    def position_embeddings(
        self, hidden_states: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) the decoder layers receive for `position_ids` (as the language model computes them)."""
        return self.language_model.rotary_emb(hidden_states, position_ids)

    def final_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The language model's final norm (the one before the LM head) applied to hidden states."""
        return self.language_model.norm(hidden_states)

    def project_queries(self, layer: nn.Module, normed: torch.Tensor) -> torch.Tensor:
        """(B, H, Q, d) queries of `layer` for normed input rows (B, Q, D), before RoPE (with the family's
        query norm, if it has one)."""
        return self.shape_queries(layer, self.query_projection(layer)(normed))

    def query_projection(self, layer: nn.Module) -> nn.Module:
        """The module whose output is `layer`'s projected queries (B, N, H*d); hooked to reuse them."""
        return layer.self_attn.q_proj

    def shape_queries(self, layer: nn.Module, projected: torch.Tensor) -> torch.Tensor:
        """(B, H, Q, d) queries before RoPE from rows (B, Q, H*d) of the query projection's output."""
        attn = layer.self_attn
        query = projected.view(*projected.shape[:2], -1, attn.head_dim)
        if getattr(attn, "q_norm", None) is not None:
            query = attn.q_norm(query)
        return query.transpose(1, 2)

    def key_projection(self, layer: nn.Module) -> nn.Module:
        """The module whose output is `layer`'s projected keys (B, N, Hkv*d); hooked to reuse them."""
        return layer.self_attn.k_proj

    def shape_keys(self, layer: nn.Module, projected: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, N, d) keys before RoPE from the key projection's output (B, N, Hkv*d)."""
        attn = layer.self_attn
        key = projected.view(*projected.shape[:2], -1, attn.head_dim)
        if getattr(attn, "k_norm", None) is not None:
            key = attn.k_norm(key)
        return key.transpose(1, 2)
