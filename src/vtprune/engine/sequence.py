"""Cutting the sequence: which slots stay (and where inserted tokens go), the hidden states of the new
sequence, and what later layers receive (mask, positions); a stage at layer 0 cuts the language model's input."""

from __future__ import annotations

import torch

from ..context import LayerInput
from ..stages import Kept
from .masks import _compact_positions, _gather_seq, _select_mask
from .request import _Ids, _Request


class _SequenceCuts:
    """PruningSession's part that cuts hidden states, masks and positions."""

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

    def _layer_mask(self, request: _Request, mask):
        """The model's mask for a layer whose attention type differs from decoder layer 0's (each type has its
        own full-length mask), restricted to the tokens after the last cut; one selection per mask object."""
        segment = request.segments[-1]
        cached = segment.setdefault("masks", {})
        if id(mask) not in cached:
            anchor, sub = segment["anchor"], segment["sub"]
            cached[id(mask)] = (mask, _select_mask(mask, anchor, sub, anchor, sub, prefill=True))
        return cached[id(mask)][1]


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
