"""Per-request state of the engine: what each token id is (`_Ids`), the request being prefilled (`_Request`),
and how a request is set up from the prompt (visual layout, padding geometry, image sizes)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ...adapters.base import VisualLayout
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
    sub: torch.Tensor | None  # None: all 0 (no inserted token yet)
    position: torch.Tensor

    @classmethod
    def base(cls, prompt: torch.Tensor, rank: torch.Tensor, valid: torch.Tensor) -> _Ids:
        batch, length = prompt.shape
        own = torch.arange(length, device=prompt.device).expand(batch, length)  # (tables are replaced, never written)
        return cls.of(prompt, rank, valid, own)

    @classmethod
    def of(cls, prompt: torch.Tensor, rank: torch.Tensor, valid: torch.Tensor, own: torch.Tensor) -> _Ids:
        """Base ids whose own index is `own` (B, N) (0..N-1 in each row)."""
        return cls(prompt=prompt, rank=rank, position_rank=rank, valid=valid, anchor=own, sub=None, position=own)

    @property
    def size(self) -> int:
        return self.prompt.shape[1]

    def append(self, **columns: torch.Tensor) -> None:
        """Add M ids per sample: every table's (B, M) values for them (the inserted tokens)."""
        if self.sub is None and "sub" in columns:
            self.sub = torch.zeros(self.prompt.shape, dtype=torch.float64, device=self.prompt.device)
        for name, values in columns.items():
            setattr(self, name, torch.cat([getattr(self, name), values], dim=1))

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
    # host bookkeeping (exact: known from the keep counts, so that no cut needs to read the device)
    present: list[int]  # per sample, visual tokens present (inserted ones included)
    other: list[int]  # per sample, the other slots of its row (text and batch padding; not engine padding)
    rank_bound: int  # every visual rank so far is below this
    padded: bool = False  # some row of `slots` may hold engine padding (-1)
    inserted: bool = False  # some id is an inserted token (anchors and sub orders differ from the ids)
    identity: bool = True  # `slots` is 0..N-1 in every row (no cut since the base sequence)
    padding_table: torch.Tensor | None = None  # (B, max V + 1) padded share per original rank (last column 0)
    cache_values: dict = field(default_factory=dict)  # per-request values the stage contexts share
    slot_cache: dict = field(default_factory=dict)  # `slot_values` of the current slots
    visual0: torch.Tensor | None = None  # (B, N0) bool, the prompt's visual tokens
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
    recorded: bool = False  # in `press.last_selection`
    # the language model's input after a layer-0 cut: prompt column of each base token, and tokens dropped
    base_prompt_columns: torch.Tensor | None = None
    base_shift: torch.Tensor | int | None = None  # (B,) tokens the layer-0 cut removed (an int: the same in every row)
    base_shift_applies: bool = False  # decode positions continue the cut input's numbering (compact)
    # the model's inputs for the base sequence, captured at decoder layer 0
    mask0: object = None
    position_embeddings0: tuple[torch.Tensor, torch.Tensor] | None = None
    position_ids0: torch.Tensor | None = None
    captured: bool = False
    current: dict | None = None  # what layers after the last cut receive instead of the model's tensors
    step: dict = field(default_factory=dict)  # decode: per-step values
    inserted_ranks: torch.Tensor | None = None  # (B,) ranks given to inserted tokens so far (None: none yet)
    unpadded: bool = False  # host fact: the prompt has no batch padding (every attention-mask entry is 1)
    kept_slots: tuple | None = None  # the deciding stage's kept tokens' slots, when known (`StageContext.slots_of`)

    @property
    def next_rank(self) -> torch.Tensor:
        """(B,) the rank the next inserted token of each sample gets (made when a stage first inserts)."""
        first = torch.tensor(self.layout.num_visual, device=self.slots.device)
        return first if self.inserted_ranks is None else first + self.inserted_ranks

    def image_span(self) -> torch.Tensor:
        """(B, 2) prompt positions of each sample's first and last visual token (computed when first asked)."""
        if "image_span" not in self.cache_values:
            prompt = torch.arange(self.prompt_len, device=self.visual0.device)
            self.cache_values["image_span"] = torch.stack(
                [
                    torch.where(self.visual0, prompt, self.prompt_len).min(dim=1).values,
                    torch.where(self.visual0, prompt, -1).max(dim=1).values,
                ],
                dim=1,
            )
        return self.cache_values["image_span"]

    def count_text(self, kinds: tuple[str, ...]) -> None:
        """Per sample, the real tokens of each text kind (text, system, instruction) in the prompt, read to the host
        in one transfer into `cache_values` (`StageContext.text_counts`; text is never cut, so they hold at every
        stage)."""
        text = self.valid0 & ~self.visual0
        prompt = torch.arange(self.prompt_len, device=text.device)
        span = self.image_span()
        masks = {"text": text, "system": text & (prompt < span[:, :1]), "instruction": text & (prompt > span[:, 1:])}
        unknown = set(kinds) - set(masks)
        if unknown:
            raise ValueError(f"text_counts: unknown text kind(s) {sorted(unknown)}: use text, system or instruction")
        table = torch.stack([masks[kind].sum(dim=1) for kind in kinds]).tolist()
        for kind, counts in zip(kinds, table):
            self.cache_values[("count", kind)] = counts

    def slot_values(self, name: str, fill) -> torch.Tensor:
        """(B, N_cur) the `name` table of the ids at the current slots (`fill` at engine padding), cached."""
        if name not in self.slot_cache:
            if self.identity:
                self.slot_cache[name] = getattr(self.ids, name)
            elif self.padded:
                self.slot_cache[name] = self.ids.at(name, self.slots, fill)
            else:
                self.slot_cache[name] = torch.gather(getattr(self.ids, name), 1, self.slots)
        return self.slot_cache[name]

    def set_slots(self, slots: torch.Tensor, padded: bool) -> None:
        self.slots, self.padded, self.identity, self.slot_cache = slots, padded, False, {}


_NEVER_PADS_WARNED: set = set()


def _warn_if_processor_never_pads(adapter, processor) -> None:
    """Warn, once per processor class and settings, when padding debiasing is on but the processor never pads
    (e.g. the center-cropping CLIP processor of converted LLaVA-1.5 checkpoints): it would silently do nothing."""
    from ...adapters.geometry import no_padding_message

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
        visual = layout.visual_mask(length, device)
        rank = visual.cumsum(dim=1) * visual - 1  # visual rank, -1 for text
        if attention_mask is not None and attention_mask.dim() == 2:
            valid0 = attention_mask.to(device=device).bool()
        else:
            valid0 = torch.ones(batch, length, dtype=torch.bool, device=device)
        prompt = torch.arange(length, device=device).expand(batch, length)
        fractions = self._padding_fractions(layout, device)
        threshold = self.press.padding_threshold()
        table = None
        if all(f is not None for f in fractions):  # (B, max V + 1), 0 after each sample's tokens
            table = torch.nn.utils.rnn.pad_sequence(
                [*fractions, torch.zeros(max(layout.num_visual) + 1, device=device)], batch_first=True
            )[:batch].float()
        num_visual = layout.num_visual
        return _Request(
            prompt_len=length,
            layout=layout,
            valid0=valid0,
            padding=[None if f is None else f > threshold for f in fractions],
            padding_fractions=fractions,
            ids=_Ids.of(prompt, rank, valid0, prompt),
            base_len=length,
            slots=prompt,
            present=list(num_visual),
            other=[length - count for count in num_visual],
            rank_bound=max(num_visual),
            padding_table=table,
            visual0=visual,
        )

    def _padding_fractions(self, layout: VisualLayout, device) -> list[torch.Tensor | None]:
        """Per sample (V_b,) padded share of each token's pixels, when the geometry is known (processor and image
        sizes); tokens above the press's padding threshold are padding."""
        batch = len(layout.num_visual)
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


def _size_list(image_sizes) -> list:
    """`image_sizes` as a list of per-image sizes; a bare (width, height) or a number is a clear error."""
    example = "e.g. image_sizes=[image.size] for one image, [a.size, b.size] for two"
    try:
        sizes = list(image_sizes)
    except TypeError:
        raise ValueError(
            f"image_sizes={image_sizes!r}: give a list with one (width, height) per image, {example}"
        ) from None
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
