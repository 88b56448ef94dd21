"""Per-request state of the engine: what each token id is (`_Ids`), the request being prefilled (`_Request`),
and how a request is set up from the prompt (visual layout, padding geometry, image sizes)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ..adapters.base import VisualLayout
from ..context import LayerInput
from ..stages import StageSelection


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
    from ..geometry import no_padding_message

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


class _RequestSetup:
    """PruningSession's part that builds a request from the prompt."""

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
        if self.image_sizes is None or self.processor is None:
            return [None] * batch
        needed = self.debias is not None and self.debias.padding
        if not self.adapter.pads_images:
            return [None] * batch
        if len(self.image_sizes) != layout.num_images:
            if not needed:
                return [None] * batch
            raise ValueError(
                f"image_sizes has {len(self.image_sizes)} entries but the batch holds {layout.num_images} "
                "images: pass one (width, height) per image, in prompt order."
            )
        try:
            fractions = self.adapter.padding_fractions(layout, self.image_sizes, self.processor)
        except ValueError:
            if needed:
                raise
            return [None] * batch  # geometry unknown for this processor; only the record would have used it
        if needed:
            _warn_if_processor_never_pads(self.adapter, self.processor)
        return [f.to(device) for f in fractions]


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
