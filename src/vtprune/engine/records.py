"""Deciding and recording a stage: the `StageContext` a press decides from, the checks of its decision, and the
`StageSelection` records (`press.last_selection`)."""

from __future__ import annotations

import torch

from ..context import LayerInput, StageContext, rows_where
from ..stages import Kept, StageSelection, member, resolve_keep
from .request import _Request


class _Planning:
    """PruningSession's part that asks the press for each stage's decision and records it."""

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

def _scatter_full(values: torch.Tensor, ranks: torch.Tensor, num_visual: int) -> torch.Tensor:
    """(V,) float32 record of per-token values over the original visual ranks, on the values' device (nan:
    absent; values of inserted tokens, ranks >= V, are not recorded)."""
    full = torch.full((num_visual + 1,), float("nan"), dtype=torch.float32, device=values.device)
    index = torch.where(ranks < num_visual, ranks, num_visual)  # inserted tokens land in a dropped extra slot
    full[index] = values.detach().float()
    return full[:num_visual]
