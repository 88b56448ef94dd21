"""Deciding and recording a stage: the `StageContext` a press decides from, the decision as one batched `Kept`
(checked unless it comes from the shared rule or a built-in method), and the `StageSelection` records
(`press.last_selection`, built per sample only when read)."""

from __future__ import annotations

import torch

from ..context import LayerInput, StageContext
from ..stages import Kept, StageSelection, batch_decisions, resolve_keep
from .request import _Request


class _Planning:
    """PruningSession's part that asks the press for each stage's decision and records it."""

    def _context(self, stage_index: int, live: LayerInput | None, request: _Request) -> StageContext:
        """The stage's context: the visual tokens present as (B, R) tensors, R the most any sample has."""
        stage = self.stages[stage_index]
        rank = request.slot_values("rank", -1)
        width = max(request.present)
        # visual slots first (rank >= 0 -> 0, text -1; descending and stable: each in sequence order)
        order = torch.argsort(rank.clamp(max=0), dim=1, descending=True, stable=True)[:, :width]
        ranks = torch.gather(rank, 1, order)
        if request.ids.position_rank is request.ids.rank:  # every token has its own rank's position (nothing inserted)
            position_rank = ranks
        else:
            position_rank = torch.gather(request.slot_values("position_rank", -1), 1, order)
        inputs = dict(request.inputs)
        if live is not None:  # the cut layer's input as the stage sees it (before its own cut)
            inputs[stage.layer] = live
        return StageContext(
            adapter=self.adapter,
            stage_index=stage_index,
            stage=stage,
            num_stages=len(self.stages),
            ranks=ranks,
            slots=order,
            present=ranks >= 0,
            position_rank=position_rank,
            slot_visual_rank=rank,
            slot_valid=request.slot_values("valid", False),
            slot_prompt_position=request.slot_values("prompt", -1),
            num_visual=list(request.layout.num_visual),
            present_counts=list(request.present),
            segments=request.layout.segments,
            image_span=request.image_span,  # (a method: called when a context needs it)
            inputs=inputs,
            state=request.state,
            vision_inputs=request.vision_inputs,
            vision_outputs=request.vision_outputs,
            vision_tokens=request.vision_tokens,
            debias_config=self.debias,
            debias_active=self.debias is not None and (self.debias.stages == "all" or stage_index == 0),
            padding_marks=list(request.padding),
            padding_fractions=list(request.padding_fractions),
            padding_table=request.padding_table,
            padding_threshold=self.press.padding_threshold(),
            request_cache=request.cache_values,
            kv_cache=request.cache,
            dry_run=self.dry_run,
            unpadded=request.unpadded and not request.padded,
            notes=list(self.notes),
        )

    def _decide(self, stage_index: int, hidden: torch.Tensor, live: LayerInput | None, request: _Request) -> Kept:
        """Ask the press for this stage's decision, as one batched `Kept` with host `counts`; check it; record it."""
        ctx = self._context(stage_index, live, request)
        owner = type(self.press).__name__
        decision = _batched(self.press.select(ctx), ctx, hidden.shape[-1], owner)
        if ctx.counts_of(decision.ranks) is None and getattr(self.press, "checked", True):
            _check_decision(decision, ctx, owner)
        if decision.counts is not None and min(decision.counts) == decision.ranks.shape[1]:
            decision.counts = None  # every entry is a token
        request.kept_slots = ctx.slots_of(decision.ranks)  # known when the shared rule chose them
        num_visual = request.layout.num_visual
        notes = list(ctx.notes)
        request.selections.append(
            StageSelection(
                layer=self.stages[stage_index].layer,
                num_visual=list(num_visual),
                keep=[
                    resolve_keep(ctx.stage.keep, num_visual[b], request.present[b], warn=False)
                    for b in range(ctx.num_samples)
                ],
                padding=list(request.padding),
                segments=request.layout.segments,
                notes=lambda: [line for note in notes for line in (note() if callable(note) else [note])],
                kept=decision.ranks,
                ranks=ctx.ranks,
                scores=ctx.recorded_scores,
                debiased=ctx.recorded_debiased,
                extra_valid=decision.extra_valid,
                num_extra=decision.num_extra,
            )
        )
        if stage_index == len(self.stages) - 1:
            request.decided = True  # recorded in `press.last_selection` when the input module returns
        return decision


def _batched(raw, ctx: StageContext, width: int, owner: str) -> Kept:
    """A press's decision as one batched `Kept` (rows padded with -1); `counts` filled where known on the host."""
    if isinstance(raw, torch.Tensor):
        raw = Kept(ranks=raw)
    if isinstance(raw, Kept):
        ranks = raw.ranks
        if (
            not isinstance(ranks, torch.Tensor)
            or ranks.dtype != torch.long
            or ranks.dim() != 2
            or ranks.shape[0] != ctx.num_samples
        ):
            raise RuntimeError(
                f"{owner}.select must return (B, K) long visual ranks (B = {ctx.num_samples}), or one per sample"
            )
        if raw.counts is None:
            raw.counts = ctx.counts_of(ranks)
        batch, kept = ranks.shape
        if raw.values is not None and tuple(raw.values.shape) != (batch, kept, width):
            raise RuntimeError(f"{owner}: values must have shape ({batch}, {kept}, {width})")
        if raw.extra is not None and (
            raw.extra.dim() != 3 or raw.extra.shape[0] != batch or raw.extra.shape[2] != width
        ):
            raise RuntimeError(f"{owner}: extra tokens must have shape ({batch}, M, {width})")
        return raw
    if len(raw) != ctx.num_samples:
        raise RuntimeError(f"{owner}.select returned {len(raw)} decisions for {ctx.num_samples} samples")
    try:
        return batch_decisions(raw, width)
    except RuntimeError as error:
        raise RuntimeError(f"{owner}: {error}") from None


def _check_decision(decision: Kept, ctx: StageContext, owner: str) -> None:
    """Check the values of a decision with one device synchronisation, which also gives its per-sample counts."""
    ranks, valid = decision.ranks, decision.ranks >= 0
    present = ctx.ranks.masked_fill(~ctx.present, -2)  # -2 matches no rank

    def member(elements, allowed):  # (B, X) in (B, Y), per row
        return (elements[:, :, None] == allowed[:, None, :]).any(dim=-1)

    checks = [
        valid[:, 0],
        (valid[:, 1:] <= valid[:, :-1]).all(dim=1) & ((ranks[:, 1:] > ranks[:, :-1]) | ~valid[:, 1:]).all(dim=1),
        (member(ranks, present) | ~valid).all(dim=1),
    ]
    messages = [
        "keeps no visual token",
        "kept ranks must be sorted and unique (-1 only at the end)",
        "keeps visual ranks that are not present at this stage",
    ]
    if decision.extra is not None:
        extra_valid = (
            decision.extra_valid
            if decision.extra_valid is not None
            else torch.ones_like(decision.extra[..., 0], dtype=torch.bool)
        )
        if decision.extra_after is not None:
            checks.append((member(decision.extra_after, ranks.masked_fill(~valid, -2)) | ~extra_valid).all(dim=1))
            messages.append("extra tokens must follow kept visual tokens")
        if decision.extra_positions is not None:
            checks.append((member(decision.extra_positions, present) | ~extra_valid).all(dim=1))
            messages.append("extra tokens take positions of tokens not present")
    table = torch.stack([check.long() for check in checks] + [valid.sum(dim=1)], dim=1).tolist()  # the one sync
    for b, row in enumerate(table):
        for ok, message in zip(row[:-1], messages):
            if not ok:
                raise RuntimeError(
                    f"{owner}: sample {b} {message}"
                    if message.startswith("keeps")
                    else f"{owner}: sample {b}: {message}"
                )
    decision.counts = [row[-1] for row in table]
