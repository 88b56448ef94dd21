"""The base class of all pruning methods ("presses") and what they report.

A press declares *what* to prune: its stages (before which decoder layer, how many visual tokens to keep),
and how to score the visual tokens still present at each stage. The engine (`vtprune.engine`) does all the
cutting; debiasing (`vtprune.debias`) is applied by the engine to every press's scores in the same way.

    press = FastV(keep=64, layer=2, debias=Debias(profile="llava-1.5-7b/fastv"))
    with press(model, processor=processor, image_sizes=[image.size]):
        out = model.generate(**inputs, max_new_tokens=32)
    press.last_selection[0].kept[0]   # visual-token indices kept by sample 0 at the first stage
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Sequence

import torch
from torch import nn

from .adapters.base import VisualSegment

if TYPE_CHECKING:
    from .debias import Debias
    from .engine import PruningSession, StageContext


@dataclass(frozen=True)
class Stage:
    """One pruning stage.

    layer: the visual tokens not kept are removed from the sequence before this decoder layer.
    keep: how many visual tokens remain after the stage: an int count, or a float in (0, 1] taken as a
        fraction of the sample's visual tokens (rounded, at least 1).
    score_layer: the decoder layer whose *input* the scores are computed from (FastV: layer - 1, i.e. the
        attention inside the previous layer); None when the press needs no model internals (Random).
    """

    layer: int
    keep: int | float
    score_layer: int | None


@dataclass
class StageSelection:
    """What one stage did to each sample of the last request. Indices count the sample's visual tokens
    in prompt order (0..V_b-1, images one after another)."""

    layer: int
    kept: list[torch.Tensor]  # per sample, (k_b,) long, sorted
    num_visual: list[int]
    scores: list[torch.Tensor | None]  # per sample, (V_b,) raw scores; nan for tokens pruned earlier
    debiased: list[torch.Tensor | None]  # per sample, (V_b,) scores after debiasing (None if not applied)
    padding: list[torch.Tensor | None]  # per sample, (V_b,) bool padding tokens (None if unknown)
    segments: list[list[VisualSegment]] = field(default_factory=list)  # per sample, its images in order


def resolve_keep(keep: int | float, num_visual: int, num_remaining: int) -> int:
    """Number of visual tokens to keep for one sample; warns and clamps when `keep` exceeds what remains."""
    if isinstance(keep, float):
        count = max(1, round(keep * num_visual))
    else:
        count = int(keep)
    if count > num_remaining:
        warnings.warn(
            f"keep={keep} asks for {count} visual tokens but only {num_remaining} remain; keeping all "
            f"{num_remaining}. Use a fraction (e.g. keep=0.25) to scale with the image.",
            UserWarning,
            stacklevel=2,
        )
        count = num_remaining
    return count


def validate_keep(keep: int | float, name: str = "keep") -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"{name} must be an int (token count) or a float in (0, 1] (fraction), got {keep!r}")
    if isinstance(keep, float):
        if not (0.0 < keep <= 1.0) or math.isnan(keep):
            raise ValueError(f"{name}={keep}: a fractional keep must lie in (0, 1]; use an int for a count.")
    elif keep <= 0:
        raise ValueError(f"{name}={keep}: keep at least one visual token (keep >= 1 or a fraction in (0, 1]).")


def as_list(value, n: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but there are {n} stages")
    return values


class Press:
    """Base class of pruning methods. Subclasses are dataclasses that implement `stages` and `score`."""

    debias: "Debias | None" = None
    last_selection: list[StageSelection]
    #: which query tokens the scores come from (recorded in calibrated profiles), e.g. "last"; None: no attention
    query: ClassVar[str | None] = None

    def stages(self) -> list[Stage]:
        raise NotImplementedError

    def score(self, ctx: "StageContext") -> list[torch.Tensor]:
        """Per sample, (R_b,) float scores of the visual tokens still in the sequence (ctx.visual_ranks[b]),
        higher = more important. Called once per stage during prefill."""
        raise NotImplementedError

    def __call__(self, model: nn.Module, *, processor=None, image_sizes: Sequence | None = None) -> "PruningSession":
        """Attach to `model` for the duration of a `with` block.

        processor: the model's processor or image processor; needed for padding debiasing (its geometry).
        image_sizes: original (width, height) of each image in the batch, in prompt order (PIL's `.size`);
            needed for padding debiasing.
        """
        from .engine import PruningSession

        return PruningSession(self, model, processor=processor, image_sizes=image_sizes)

    def validate(self, num_layers: int) -> list[Stage]:
        """Check the stages against a model with `num_layers` decoder layers; return them."""
        stages = self.stages()
        if not stages:
            raise ValueError(f"{type(self).__name__} declares no stage")
        previous_layer, previous_keep = 0, None
        for stage in stages:
            validate_keep(stage.keep)
            if not (1 <= stage.layer < num_layers):
                raise ValueError(
                    f"{type(self).__name__}: layer={stage.layer} is out of range; the model has {num_layers} "
                    f"decoder layers, so pruning can happen before layers 1..{num_layers - 1} (layer 0 must see "
                    "every token)."
                )
            if stage.layer <= previous_layer and previous_keep is not None:
                raise ValueError(f"{type(self).__name__}: stage layers must increase, got {[s.layer for s in stages]}")
            if stage.score_layer is not None and not (0 <= stage.score_layer <= stage.layer):
                raise ValueError(f"score_layer={stage.score_layer} must lie in [0, layer={stage.layer}]")
            if stage.score_layer is not None and stage.score_layer < previous_layer:
                raise ValueError("a stage cannot be scored before the previous stage has cut")
            if (
                previous_keep is not None
                and type(stage.keep) is type(previous_keep)
                and stage.keep > previous_keep
            ):
                raise ValueError(f"keep must not grow from one stage to the next, got {[s.keep for s in stages]}")
            previous_layer, previous_keep = stage.layer, stage.keep
        return stages


__all__ = ["Press", "Stage", "StageSelection", "resolve_keep", "validate_keep", "as_list"]
