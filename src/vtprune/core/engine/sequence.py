"""Cutting the sequence: which slots stay (and where inserted tokens go), the hidden states of the new
sequence, and what later layers receive (mask, positions); a stage at layer 0 cuts the language model's input.

Everything is batched over the samples; the new length comes from the host bookkeeping of the request
(`present`, `other`), so a cut whose keep counts are known reads nothing from the device."""

from __future__ import annotations

import torch

from ..context import LayerInput
from ..stages import Kept
from .masks import _compact_positions, _gather_seq, _select_mask
from .request import _Ids, _Request

_LAST = torch.iinfo(torch.long).max


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
        decision = self._decide(0, embeds, None, request)
        if self.dry_run:
            return None
        batch, length = request.slots.shape
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(length, device=embeds.device).expand(batch, length)
        new_slots, source, padded = self._apply(decision, request)
        hidden = _assemble(embeds, source, new_slots, decision, request, padded)
        request.set_slots(new_slots, padded)
        valid = request.slot_values("valid", False)
        if self._positions(0) == "compact":
            new_positions = _compact_positions(position_ids, request.valid0, valid)
        else:
            new_positions = _gather_seq(position_ids, request.slot_values("position", 0))
        # the cut sequence becomes the base sequence of every decoder layer (engine padding: masked base slots)
        request.base_prompt_columns = request.slot_values("prompt", -1)
        request.base_shift = request.valid0.sum(1) - valid.sum(1)
        request.base_shift_applies = self._positions(0) == "compact"
        new_len = new_slots.shape[1]
        ids = _Ids.base(request.base_prompt_columns, request.slot_values("rank", -1), valid)
        ids.position_rank = request.slot_values("position_rank", -1)
        request.ids = ids
        request.slots, request.identity, request.padded, request.inserted, request.slot_cache = ids.anchor, True, False, False, {}
        request.other = [new_len - count for count in request.present]  # engine padding became masked base slots
        request.base_len = new_len
        new_kwargs = dict(kwargs, inputs_embeds=hidden, attention_mask=valid.long(), position_ids=new_positions)
        return args, new_kwargs

    def _apply(self, decision: Kept, request: _Request) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Apply `decision` to the current slots. Returns the new slots (B, N_new) of ids (kept tokens in order,
        inserted tokens after their anchors, samples left-padded to one length), per new slot where its row comes
        from (B, N_new): a current slot, N_cur + j for the sample's j-th inserted token, -1 for engine padding;
        and whether any row is padded. Registers the inserted ids and updates the host bookkeeping."""
        slots = request.slots
        batch, length = slots.shape
        device = slots.device
        rank = request.slot_values("rank", -1)
        ranks, counts = decision.ranks, decision.counts
        extra = decision.num_extra
        extra_counts = [extra] * batch
        if decision.extra_valid is not None:
            extra_counts = decision.extra_counts if decision.extra_counts is not None else decision.extra_valid.sum(dim=1).tolist()
        kept_counts = counts if counts is not None else [ranks.shape[1]] * batch
        request.present = [k + m for k, m in zip(kept_counts, extra_counts)]
        lengths = [other + present for other, present in zip(request.other, request.present)]
        new_len, padded = max(lengths), min(lengths) < max(lengths)
        table = torch.zeros(batch, request.rank_bound + 1, dtype=torch.bool, device=device)
        table.scatter_(1, ranks.masked_fill(ranks < 0, request.rank_bound) if counts is not None else ranks, True)
        keep = (rank < 0) | torch.gather(table, 1, rank.clamp(min=0))
        if request.padded:
            keep = keep & (slots >= 0)
        if not extra and not padded:  # every row keeps new_len slots, in order
            source = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :new_len]
            return torch.gather(slots, 1, source), source, False
        position = torch.arange(length, device=device, dtype=torch.float64).expand(batch, length)
        order_key = torch.where(keep, position, float("inf"))  # dropped slots sort last
        keys, sources = [order_key], [torch.arange(length, device=device).expand(batch, length)]
        if extra:
            first_new = request.ids.size
            request.ids.grow(extra)
            keys.append(self._register_inserted(decision, rank, first_new, request))
            sources.append(length + torch.arange(extra, device=device).expand(batch, extra))
            request.inserted = True
            request.rank_bound += extra
        order_key, source = torch.cat(keys, dim=1), torch.cat(sources, dim=1)
        order = torch.argsort(order_key, dim=1, stable=True)[:, :new_len]
        source = torch.gather(source, 1, order)
        if padded:  # left-pad: move each row's tokens to the end
            shift = torch.tensor([new_len - n for n in lengths], device=device)[:, None]
            column = torch.arange(new_len, device=device).expand(batch, new_len)
            valid = column >= shift
            source = torch.where(valid, torch.gather(source, 1, (column - shift).clamp(min=0)), -1)
        all_ids = slots
        if extra:
            all_ids = torch.cat([slots, first_new + torch.arange(extra, device=device).expand(batch, -1)], 1)
        new_slots = torch.gather(all_ids, 1, source.clamp(min=0) if padded else source)
        if padded:
            new_slots = new_slots.masked_fill(source < 0, -1)
        return new_slots, source, padded

    def _register_inserted(self, decision: Kept, slot_rank: torch.Tensor, first_new: int,
                           request: _Request) -> torch.Tensor:
        """Fill the id tables of the inserted tokens (B, M); return their sequence order keys (B, M) float64
        (inf for the entries of `extra_valid` that are not tokens)."""
        ids, slots = request.ids, request.slots
        batch, count = decision.extra.shape[:2]
        device = slots.device
        valid = decision.extra_valid if decision.extra_valid is not None else torch.ones(batch, count, dtype=torch.bool, device=device)
        after = decision.extra_after
        if after is None:  # the last kept rank of each row
            last = decision.ranks.masked_fill(decision.ranks < 0, -1).max(dim=1, keepdim=True).values
            after = last.expand(batch, count)
        before = decision.extra_before.bool() if decision.extra_before is not None else torch.zeros_like(valid)
        sources = after if decision.extra_positions is None else decision.extra_positions
        anchor_slots = _slots_of_ranks(slot_rank, after)  # (B, M)
        source_slots = _slots_of_ranks(slot_rank, sources)
        anchor_ids, source_ids = torch.gather(slots, 1, anchor_slots), torch.gather(slots, 1, source_slots)
        # tokens on the same side of the same anchor keep their order: fractions (j + 1) / (n + 1) in their group
        same = ((anchor_slots[:, None, :] == anchor_slots[:, :, None]) & (before[:, None, :] == before[:, :, None])
                & valid[:, None, :])
        earlier = torch.tril(same, diagonal=-1).sum(dim=2).double()
        within = (earlier + 1) / (same.sum(dim=2).double() + 1)
        new = slice(first_new, first_new + count)
        ids.prompt[:, new] = torch.gather(ids.prompt, 1, anchor_ids)
        ids.rank[:, new] = torch.where(valid, request.next_rank[:, None] + valid.long().cumsum(dim=1) - 1, -1)
        request.next_rank = request.next_rank + valid.sum(dim=1)
        ids.position_rank[:, new] = torch.gather(ids.position_rank, 1, source_ids)
        ids.valid[:, new] = valid
        ids.anchor[:, new] = torch.gather(ids.anchor, 1, anchor_ids)
        own = torch.gather(ids.sub, 1, anchor_ids)
        after_sub = own + within * _sub_gap(ids, anchor_ids, above=True)
        before_sub = own - (1 - within) * _sub_gap(ids, anchor_ids, above=False)
        ids.sub[:, new] = torch.where(before, before_sub, after_sub)
        ids.position[:, new] = torch.gather(ids.position, 1, source_ids)
        key = torch.where(before, anchor_slots.double() - 1 + within, anchor_slots.double() + within)
        return torch.where(valid, key, float("inf"))

    def _cut(self, stage_index: int, hidden: torch.Tensor, decision: Kept, request: _Request) -> torch.Tensor:
        """Apply this stage's decision to `hidden` (B, N_cur, D) and rebuild what later layers receive."""
        new_slots, source, padded = self._apply(decision, request)
        hidden = _assemble(hidden, source, new_slots, decision, request, padded)
        request.set_slots(new_slots, padded)
        inserted = request.inserted
        anchor = request.slot_values("anchor", -1) if inserted else new_slots  # base tokens are their own anchor
        sub = request.slot_values("sub", 0.0) if inserted else None
        shift = None
        if self._positions(stage_index) == "compact":
            valid = request.slot_values("valid", False)
            base_valid = request.ids.valid[:, : request.base_len]
            position_ids = _compact_positions(request.position_ids0, base_valid, valid)
            position_embeddings = self.adapter.position_embeddings(hidden, position_ids)
            shift = base_valid.sum(1) - valid.sum(1)
        else:
            source = request.slot_values("position", -1) if inserted else new_slots
            position_ids = None
            if request.position_ids0 is not None:
                position_ids = _gather_seq(request.position_ids0, source, padded)
            position_embeddings = tuple(_gather_seq(t, source, padded) for t in request.position_embeddings0)
        request.segments.append({"layer": self.stages[stage_index].layer, "slots": new_slots, "anchor": anchor,
                                 "sub": sub, "shift": shift, "padded": padded, "inserted": inserted})
        request.current = {
            "attention_mask": _select_mask(request.mask0, anchor, sub, anchor, sub, prefill=True, padded=padded),
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
            cached[id(mask)] = (mask, _select_mask(mask, anchor, sub, anchor, sub, prefill=True, padded=segment["padded"]))
        return cached[id(mask)][1]


def _slots_of_ranks(slot_rank: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """(B, M) slots holding each of `ranks` (B, M), given the rank of every slot (B, N) (-1: not visual)."""
    match = slot_rank[:, None, :] == ranks[:, :, None]  # (B, M, N)
    return match.long().argmax(dim=2)


def _sub_gap(ids: _Ids, anchor_ids: torch.Tensor, above: bool = True) -> torch.Tensor:
    """(B, M) room between each anchor token's sub order and the next sub order among the tokens of its anchor,
    above it (tokens inserted after) or below it (before)."""
    base, own = torch.gather(ids.anchor, 1, anchor_ids), torch.gather(ids.sub, 1, anchor_ids)  # (B, M)
    subs = ids.sub[:, None, :]
    same = (ids.anchor[:, None, :] == base[:, :, None]) & ids.valid[:, None, :]  # (B, M, ids)
    if above:
        nearest = torch.where(same & (subs > own[:, :, None]), subs, float("inf")).min(dim=2).values
        return torch.where(torch.isinf(nearest), 1.0, nearest - own)
    nearest = torch.where(same & (subs < own[:, :, None]), subs, float("-inf")).max(dim=2).values
    return torch.where(torch.isinf(nearest), 1.0, own - nearest)


def _assemble(hidden: torch.Tensor, source: torch.Tensor, new_slots: torch.Tensor, decision: Kept,
              request: _Request, padded: bool) -> torch.Tensor:
    """The hidden states (B, N_new, D) of `new_slots`: rows of `hidden` (B, N, D) or of the inserted tokens as
    `source` says (engine padding 0), merged values written into the kept visual tokens. No host sync."""
    batch, length, width = hidden.shape
    rows = hidden if decision.extra is None else torch.cat([hidden, decision.extra.to(hidden.dtype)], dim=1)
    index = source.clamp(min=0) if padded else source
    out = torch.gather(rows, 1, index[:, :, None].expand(-1, -1, width))
    if padded:
        out = out.masked_fill((source < 0)[:, :, None], 0.0)
    if decision.values is not None:
        ranks = decision.ranks
        if decision.counts is not None:
            ranks = ranks.masked_fill(ranks < 0, _LAST)
        new_rank = request.ids.at("rank", new_slots, -1)
        index = torch.searchsorted(ranks, new_rank).clamp(max=ranks.shape[1] - 1)
        values = torch.gather(decision.values, 1, index[:, :, None].expand(-1, -1, width)).to(out.dtype)
        target = (torch.gather(ranks, 1, index) == new_rank) & (source >= 0) & (source < length)
        target = target & ~torch.isnan(values).any(dim=2)  # nan rows (per-sample decisions without values): keep
        out = torch.where(target[:, :, None], values, out)
    return out
