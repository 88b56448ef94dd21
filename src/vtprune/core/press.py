"""The base class of all pruning methods ("presses").

A press declares *what* to prune: its stages (before which decoder layer, how many visual tokens to keep,
which layer's attention to score with) and, per stage, *which* visual tokens stay (`select`), from what a
`StageContext` offers (attention of any query tokens, keys, hidden states, debiasing). The engine
(`vtprune.core.engine`) does all the cutting; a press never touches caches, masks or positions.

    press = FastV(keep=64, layer=2, debias=Debias(profile="llava-1.5-7b/fastv"))
    with press(model, processor=processor, image_sizes=[image.size]):
        out = model.generate(**inputs, max_new_tokens=32)
    press.last_selection[0].kept[0]   # visual-token indices kept by sample 0 at the first stage

Most methods only implement `stages` and `score`: the default `select` debiases the scores (`ctx.debias`)
and keeps the top-k (`ctx.top_k`), the rule every method shares. Scores and decisions are batched tensors:
scores (B, R) over the visual tokens present (`ctx.ranks`), decisions (B, K) visual ranks (or a `Kept`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..adapters.geometry import combine_image_sizes
from ..debias import Debias
from .budgets import keeps_for_budget
from .context import StageContext
from .engine import PruningSession
from .selections import LastSelection
from .stages import Kept, Stage, StageSelection, as_list, equivalent_tokens, validate_stages

if TYPE_CHECKING:
    from .stages import Positions

#: the model the published schedules and layers refer to (LLaVA-1.5-7B: 32 decoder layers, 576 visual tokens)
REFERENCE_LAYERS = 32
REFERENCE_TOKENS = 576
#: the budget of the debiasing paper's runs, the default of methods with published schedules
DEFAULT_BUDGET = 128


#: the methods shipped with vtprune (registered as their classes are defined), for error messages
_METHODS: dict[str, type] = {}


def _reads_vision_tower(press_or_class) -> bool:
    """Whether a press (or a method class with its default options) reads the vision tower."""
    press = press_or_class
    if isinstance(press_or_class, type):
        try:
            press = press_or_class()
        except Exception:  # a method that cannot be built without options
            return False
    return bool(press.vision_layers() or press.vision_stages(0))


class Press(LastSelection):
    """Base class of pruning methods. Subclasses are dataclasses with (at least) a `debias` and a `positions`
    field, and implement `stages` and `score` (or `select`)."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name") and cls.__module__.startswith("vtprune.methods"):
            _METHODS[cls.name] = cls

    #: the schedule fields of the methods that have them (dataclass fields there; absent on a method without them)
    keep: Any
    layer: Any
    budget: Any

    #: registry / CLI name, e.g. "fastv"
    name: ClassVar[str] = ""
    #: one line for tables and --help
    summary: ClassVar[str] = ""
    #: which query tokens the scores come from (recorded in calibrated profiles), e.g. "last"; None: the method
    #: uses no attention, so there is nothing to debias
    query: ClassVar[str | None] = None
    #: published debiasing settings, used where `Debias` leaves them unset (None)
    debias_defaults: ClassVar[dict] = {"padding_threshold": 0.5, "drop_padding": False}
    #: the method's name in built-in profile names (llava-1.5-7b/<profile_name>/<benchmark>); default `name`
    profile_name: ClassVar[str | None] = None
    #: whether the engine checks the decisions `select` returns (sorted, present ranks; one device synchronisation
    #: per stage). Decisions made by `ctx.top_k` are never checked; built-in methods, tested against oracles, set
    #: False.
    checked: ClassVar[bool] = True
    #: text kinds ("text", "system", "instruction") whose per-sample counts the method reads on the host
    #: (`ctx.text_counts`): the engine reads them at the request's start, with the prompt, so that no stage reads
    #: the device (a compiled model traces the decoder layers without a break)
    text_counts: ClassVar[tuple[str, ...]] = ()

    debias: Debias | None = None
    positions: Positions = "original"
    last_selection: list[StageSelection]  # per thread (`selections.LastSelection`)

    # --- what a method implements ----------------------------------------------------------------------
    def stages(self, num_layers: int = REFERENCE_LAYERS) -> list[Stage]:
        """The stages on a model with `num_layers` decoder layers."""
        raise NotImplementedError

    def score(self, ctx: StageContext) -> torch.Tensor:
        """(B, R) float scores of the visual tokens present (aligned with `ctx.ranks`; entries where
        `ctx.present` is False are ignored), higher = more important: the attention-derived score the method
        ranks by (debiased by the default `select`)."""
        raise NotImplementedError

    def select(self, ctx: StageContext) -> torch.Tensor | Kept | list:
        """The visual ranks that stay: (B, K) long, each row sorted (rows of samples keeping fewer end in -1, with
        `Kept.counts`), or a `Kept` with merged/inserted tokens; or one decision per sample (a list of sorted
        (k_b,) tensors or `Kept`s), which the engine pads. Default: the top-k of the debiased scores."""
        return ctx.top_k(ctx.debias(self.score(ctx)))

    def vision_layers(self) -> tuple[int, ...]:
        """Vision-tower layers whose input the method reads (negative: from the end), e.g. (-2,) for the
        [CLS] attention of the second-to-last layer."""
        return ()

    def vision_stages(self, num_vision_layers: int) -> list:
        """`VisionStage`s inside the vision tower (default none), for a tower of `num_vision_layers` layers."""
        return []

    def select_vision(self, vctx) -> tuple[torch.Tensor, torch.Tensor | None]:
        """At a vision stage: (N, T') long, sorted, the tokens of each image that stay (same count per image), and
        (N, T', D) their new output values, or None to keep the layer's own."""
        raise NotImplementedError(f"{type(self).__name__} declares vision stages but no select_vision")

    def input_layers(self) -> tuple[int, ...]:
        """Decoder layers (besides the stages' score layers) whose input the method reads, e.g. (0,) for the
        language model's input embeddings."""
        return ()

    # --- shared machinery --------------------------------------------------------------------------------
    @classmethod
    def create(cls, **options) -> Press:
        """Build from generic options (the CLI's): those set to None are left at the method's defaults; an
        option the method does not take is an error naming it."""
        from dataclasses import fields

        accepted = {f.name for f in fields(cls) if f.init}  # type: ignore[arg-type]  # every method is a dataclass
        given = {k: v for k, v in options.items() if v is not None}
        unknown = sorted(set(given) - accepted)
        if unknown:
            raise ValueError(
                f"{cls.name or cls.__name__} takes no {', '.join(unknown)} (it takes {', '.join(sorted(accepted))})"
            )
        return cls(**given)

    def __call__(
        self,
        model: nn.Module,
        *,
        processor=None,
        images: Sequence | None = None,
        image_sizes: Sequence | None = None,
        dry_run: bool = False,
    ) -> PruningSession:
        """Attach to `model` for the duration of a `with` block.

        processor: the model's processor or image processor; needed for padding debiasing (its geometry).
        images: the PIL images of the batch, in prompt order (their sizes give the padding geometry); or
        image_sizes: original (width, height) of each image, PIL's `.size` (not the (height, width) of
            transformers' `image_sizes`: where the processor's inputs carry those, vtprune reads them and checks
            these against them). One of them is needed for padding debiasing on families that pad.
        dry_run: decide and record every stage, cut nothing (the model runs unpruned).
        """
        self._check_family(model)
        image_sizes = combine_image_sizes(images, image_sizes)
        return PruningSession(self, model, processor=processor, image_sizes=image_sizes, dry_run=dry_run)

    def _check_family(self, model: nn.Module) -> None:
        """Refuse, naming the methods that work, a method that reads a vision tower vtprune cannot read."""
        from ..adapters import adapter_for

        reason = adapter_for(model).vision_side_unsupported
        if reason and _reads_vision_tower(self):
            working = [name for name, cls in _METHODS.items() if not _reads_vision_tower(cls)]
            raise ValueError(
                f"{type(self).__name__} reads the vision tower, which vtprune cannot do on {type(model).__name__}: "
                f"{reason}. Methods that work on this model: {', '.join(working)}."
            )

    def validate(self, num_layers: int) -> list[Stage]:
        """Check the stages against a model with `num_layers` decoder layers; return them."""
        return validate_stages(self.stages(num_layers), num_layers, type(self).__name__)

    def resolved_debias(self) -> Debias | None:
        """`debias` with the method's published defaults filled in (None: no debiasing)."""
        if self.debias is None:
            return None
        return self.debias.with_defaults(**self.debias_defaults)

    def padding_threshold(self) -> float:
        """The padded-pixel share above which a token counts as padding, for this method."""
        debias = self.resolved_debias()
        return debias.padding_threshold if debias is not None else self.debias_defaults["padding_threshold"]

    def equivalent_tokens(self, num_visual: int = REFERENCE_TOKENS, num_layers: int = REFERENCE_LAYERS) -> float:
        """Visual tokens each decoder layer processes, averaged over the layers (the papers' "equivalent"
        budget), on a model with `num_layers` layers and `num_visual` visual tokens (default LLaVA-1.5-7B)."""
        return equivalent_tokens(self.stages(num_layers), num_visual, num_layers)

    def _check_schedule(self) -> None:
        """Validate the schedule fields (`keep`, `budget`, `layer`) of methods that have them."""
        keep, budget, layer = getattr(self, "keep", None), getattr(self, "budget", None), getattr(self, "layer", None)
        if keep is not None and budget is not None:
            raise ValueError(f"{type(self).__name__}: give keep= or budget=, not both")
        if budget is not None:
            budget_fraction(budget)
        if layer is not None:
            layer_list(layer)
        owner = type(self).__name__
        if isinstance(keep, (list, tuple)):
            kinds = {type(k) for k in keep if isinstance(k, (int, float)) and not isinstance(k, bool)}
            if kinds == {int, float}:
                raise ValueError(
                    f"{owner}: keep={list(keep)} mixes fractions (floats) and token counts (ints): give every stage a "
                    "count (e.g. [144, 30]) or every stage a fraction of the image's visual tokens (e.g. [0.25, 0.05])"
                )
        # structural mistakes (a keep list that does not match the layers, keeps that grow, layers that do not
        # increase) fail here rather than at first use; the range of layers is checked against the model
        try:
            stages = self.stages(REFERENCE_LAYERS)
        except ValueError as error:
            if str(error).startswith(owner):
                raise
            raise ValueError(f"{owner}: {error}") from None
        validate_stages(stages, 10**6, owner)

    def _single_keep(self) -> int | float:
        """A one-stage method's keep: `keep`, or the budget (default 128 of 576) as a fraction of the tokens."""
        if getattr(self, "keep", None) is not None:
            return self.keep
        budget = getattr(self, "budget", None)
        return budget_fraction(DEFAULT_BUDGET if budget is None else budget)

    def _layers_and_keeps(
        self, num_layers: int, default_layers: Sequence[int], tables: dict | None = None, default_keep: int | float = 64
    ) -> tuple[list[int], list]:
        """The stage layers and keeps from the schedule fields: explicit `layer` or the published layers at the
        model's depth; explicit `keep`, or the budget mapped through the published `tables` (None: the budget is
        the count kept, as for FastV), or the defaults."""
        layers = layer_list(self.layer) if self.layer is not None else scale_layers(default_layers, num_layers)
        if self.keep is not None:
            return layers, as_list(self.keep, len(layers), "keep")
        if tables is None:
            keep = default_keep if self.budget is None else budget_fraction(self.budget)
            return layers, as_list(keep, len(layers), "keep")
        budget = DEFAULT_BUDGET if self.budget is None else self.budget
        keeps = keeps_for_budget(tables, budget, budget_fraction(budget), layers, num_layers, schedule_for_budget)
        if len(keeps) != len(layers):
            raise ValueError(
                f"{type(self).__name__}: the budget gives {len(keeps)} stages but layer= has {len(layers)}; pass keep= too"
            )
        return layers, keeps

    def _check_common(self) -> None:
        """Validate the fields every press has (call from `__post_init__`)."""
        if self.debias is not None and not isinstance(self.debias, Debias):
            raise TypeError(
                f"{type(self).__name__}(debias={self.debias!r}): pass vtprune.Debias(...) (e.g. Debias(profile='auto')) "
                "or None"
            )
        if self.debias is not None and self.query is None:
            raise ValueError(f"{type(self).__name__} ranks without attention scores: there is nothing to debias")
        if self.positions not in ("original", "compact"):
            raise ValueError(f"positions={self.positions!r}: use 'original' or 'compact'")


# --- helpers for methods -------------------------------------------------------------------------------
def layer_list(value, name: str = "layer") -> list[int]:
    """A layer or a list of layers as a list of ints (rejecting floats and bools)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    for item in values:
        if isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f"{name} must be an int or a list of ints, got {value!r}")
        if item < 0:
            raise ValueError(
                f"{name}={value!r}: layers count from 0 (the first decoder layer); negative indices are not accepted"
            )
    return values


def scale_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """Published stage layers (for LLaVA-1.5-7B's 32 layers) on a model with `num_layers` layers: the first
    stays where it is (a shallow layer), later ones move to the same relative depth, strictly increasing."""
    if num_layers == REFERENCE_LAYERS:
        return list(layers)
    out = [max(min(layers[0], 1), min(layers[0], num_layers - len(layers)))]  # a layer >= 1 stays >= 1
    for layer in layers[1:]:
        out.append(max(out[-1] + 1, round(layer * num_layers / REFERENCE_LAYERS)))
    if out[-1] >= num_layers:
        raise ValueError(f"the schedule {list(layers)} does not fit a model with {num_layers} decoder layers")
    return out


def budget_fraction(budget: int | float, name: str = "budget") -> float:
    """A budget as a fraction of the visual tokens: a float in (0, 1], or a count of LLaVA-1.5-7B's 576."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"{name} must be a token count (int) or a fraction in (0, 1] (float), got {budget!r}")
    if isinstance(budget, float):
        if math.isnan(budget) or not (0.0 < budget <= 1.0):
            raise ValueError(f"{name}={budget}: a fractional budget must lie in (0, 1]; an int is a token count of 576")
        return budget
    if not (1 <= budget <= REFERENCE_TOKENS):
        raise ValueError(
            f"{name}={budget}: a token budget must lie in 1..{REFERENCE_TOKENS} (LLaVA-1.5-7B's visual tokens)"
        )
    return budget / REFERENCE_TOKENS


def interpolate_table(tables: dict[int, Sequence[float]], budget: int | float) -> list[float]:
    """Values for `budget` from published ones {budget (of 576): values}: a published budget gives its values
    exactly; between two, each value interpolates linearly; outside, the nearest scales in proportion."""
    points = sorted(tables)
    target = budget_fraction(budget) * REFERENCE_TOKENS
    if target <= points[0] or target >= points[-1]:
        edge = points[0] if target <= points[0] else points[-1]
        return [value * target / edge for value in tables[edge]]
    high = next(p for p in points if p >= target)
    low = max(p for p in points if p <= target)
    weight = 0.0 if high == low else (target - low) / (high - low)
    return [a + weight * (b - a) for a, b in zip(tables[low], tables[high])]


def schedule_for_budget(tables: dict[int, Sequence[float]], budget: int | float) -> list[float]:
    """Keep fractions per stage for `budget`, from published schedules {budget (of 576): kept counts}
    (`interpolate_table`); fractions are capped at 1 and never grow across stages."""
    out, previous = [], 1.0
    for keep in interpolate_table(tables, budget):
        previous = min(previous, keep / REFERENCE_TOKENS)
        out.append(previous)
    return out


__all__ = [
    "Press",
    "REFERENCE_LAYERS",
    "REFERENCE_TOKENS",
    "layer_list",
    "scale_layers",
    "budget_fraction",
    "interpolate_table",
    "schedule_for_budget",
]
