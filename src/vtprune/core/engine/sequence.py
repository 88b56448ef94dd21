"""Cutting the sequence: which slots stay (and where inserted tokens go), the hidden states of the new
sequence, and what later layers receive (mask, positions); a stage at layer 0 cuts the language model's input.

Everything is batched over the samples; the new length comes from the host bookkeeping of the request
(`present`, `other`), so a cut whose keep counts are known reads nothing from the device."""

from __future__ import annotations

import torch

from ..context import LayerInput
from ..stages import Kept
from .masks import _compact_positions, _gather_embeddings, _gather_seq, _select_mask
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
        given = kwargs.get("position_ids")
        new_slots, source, padded = self._apply(decision, request, base_cut=True)
        unpadded_before, request.unpadded = request.unpadded, request.unpadded and not padded
        hidden = _assemble(embeds, source, new_slots, decision, request, padded)
        request.set_slots(new_slots, padded)
        valid = request.slot_values("valid", False)
        if self._positions(0) == "compact" and given is None and request.unpadded and unpadded_before:
            new_positions = torch.arange(new_slots.shape[1], device=embeds.device).expand(batch, -1)  # 0.. per row
        else:
            position_ids = (
                given if given is not None else torch.arange(length, device=embeds.device).expand(batch, length)
            )
            if self._positions(0) == "compact":
                new_positions = _compact_positions(position_ids, request.valid0, valid)
            else:
                new_positions = _gather_seq(position_ids, request.slot_values("position", 0))
        # the cut sequence becomes the base sequence of every decoder layer (engine padding: masked base slots)
        request.base_prompt_columns = request.slot_values("prompt", -1)
        if unpadded_before and request.unpadded:  # every token real before and after: one shift for the batch
            request.base_shift = length - new_slots.shape[1]
        else:
            request.base_shift = request.valid0.sum(1) - valid.sum(1)
        request.base_shift_applies = self._positions(0) == "compact"
        new_len = new_slots.shape[1]
        ranks = request.slot_values("rank", -1)
        same = request.ids.position_rank is request.ids.rank  # every token at its own rank's position
        ids = _Ids.base(request.base_prompt_columns, ranks, valid)
        ids.position_rank = ranks if same else request.slot_values("position_rank", -1)
        request.ids = ids
        request.slots, request.identity, request.padded, request.inserted, request.slot_cache = (
            ids.anchor,
            True,
            False,
            False,
            {},
        )
        request.other = [new_len - count for count in request.present]  # engine padding became masked base slots
        request.base_len = new_len
        new_kwargs = dict(kwargs, inputs_embeds=hidden, attention_mask=valid.long(), position_ids=new_positions)
        return args, new_kwargs

    def _apply(
        self, decision: Kept, request: _Request, base_cut: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
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
            extra_counts = (
                decision.extra_counts if decision.extra_counts is not None else decision.extra_valid.sum(dim=1).tolist()
            )
        kept_counts = counts if counts is not None else [ranks.shape[1]] * batch
        request.present = [k + m for k, m in zip(kept_counts, extra_counts)]
        lengths = [other + present for other, present in zip(request.other, request.present)]
        new_len, padded = max(lengths), min(lengths) < max(lengths)
        known, request.kept_slots = request.kept_slots, None
        if known is not None and known[1] is None and not extra and not padded and not request.padded:
            # every entry is a kept token: -1 for text and kept slots, 0 for the others; kept slots first, in order
            key = rank.clamp(max=0).scatter(1, known[0], -1)
            source = torch.argsort(key, dim=1, stable=True)[:, :new_len]
            return (source if request.identity else torch.gather(slots, 1, source)), source, False
        if known is not None and known[1] is None:  # every entry is a kept token: mark their slots among the text
            keep = (rank < 0).scatter(1, known[0], True)
        else:  # from the kept ranks: a table of kept ranks read at each slot's rank
            table = torch.zeros(batch, request.rank_bound + 1, dtype=torch.bool, device=device)
            table.scatter_(1, ranks.masked_fill(ranks < 0, request.rank_bound) if counts is not None else ranks, True)
            keep = (rank < 0) | torch.gather(table, 1, rank.clamp(min=0))
        if request.padded:
            keep = keep & (slots >= 0)
        if not extra and not padded:  # every row keeps new_len slots, in order
            source = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :new_len]
            return (source if request.identity else torch.gather(slots, 1, source)), source, False
        position = torch.arange(length, device=device, dtype=torch.float64).expand(batch, length)
        order_key = torch.where(keep, position, float("inf"))  # dropped slots sort last
        first_new = request.ids.size
        if extra:
            order_key = torch.cat([order_key, self._register_inserted(decision, rank, request, base_cut)], dim=1)
            request.inserted = True
            request.rank_bound += extra
        # where each new slot comes from: a current slot, or N_cur + j for the sample's j-th inserted token
        source = torch.argsort(order_key, dim=1, stable=True)[:, :new_len]
        if padded:  # left-pad: move each row's tokens to the end
            shift = torch.tensor([new_len - n for n in lengths], device=device)[:, None]
            column = torch.arange(new_len, device=device).expand(batch, new_len)
            valid = column >= shift
            source = torch.where(valid, torch.gather(source, 1, (column - shift).clamp(min=0)), -1)
        if request.identity and first_new == length:  # slots 0..N-1 and the inserted ids right after: the same numbers
            new_slots = source.clamp(min=0) if padded else source
        else:
            all_ids = slots
            if extra:
                all_ids = torch.cat([slots, first_new + torch.arange(extra, device=device).expand(batch, -1)], 1)
            new_slots = torch.gather(all_ids, 1, source.clamp(min=0) if padded else source)
        if padded:
            new_slots = new_slots.masked_fill(source < 0, -1)
        return new_slots, source, padded

    def _register_inserted(
        self, decision: Kept, slot_rank: torch.Tensor, request: _Request, base_cut: bool = False
    ) -> torch.Tensor:
        """Append the id tables of the inserted tokens (B, M); return their sequence order keys (B, M) float64
        (inf for the entries of `extra_valid` that are not tokens). base_cut: the cut makes a new base sequence
        (layer 0), which keeps no anchors or sub orders: those are not registered."""
        ids, slots = request.ids, request.slots
        batch, count = decision.extra.shape[:2]
        valid = decision.extra_valid  # None: every entry is a token
        after = decision.extra_after
        if after is None:  # the last kept rank of each row
            last = decision.ranks.masked_fill(decision.ranks < 0, -1).max(dim=1, keepdim=True).values
            after = last.expand(batch, count)
        before = decision.extra_before.bool() if decision.extra_before is not None else None  # None: all after
        slot_of = _rank_slots(slot_rank, request.rank_bound)
        anchor_slots = torch.gather(slot_of, 1, after.clamp(0, request.rank_bound))  # (B, M)
        anchor_ids = torch.gather(slots, 1, anchor_slots)
        if decision.extra_positions is None:
            source_ids = anchor_ids
        else:
            source_ids = torch.gather(
                slots, 1, torch.gather(slot_of, 1, decision.extra_positions.clamp(0, request.rank_bound))
            )
        # tokens on the same side of the same anchor keep their order: fractions (j + 1) / (n + 1) in their group
        same = anchor_slots[:, None, :] == anchor_slots[:, :, None]  # (B, M, M)
        if before is not None:
            same = same & (before[:, None, :] == before[:, :, None])
        if valid is not None:
            same = same & valid[:, None, :]
        earlier = torch.tril(same, diagonal=-1).sum(dim=2)
        within = (earlier + 1) / (same.sum(dim=2) + 1).double()
        if base_cut:
            after_sub = before_sub = None
        elif ids.sub is None:  # the first insertion: every token has sub order 0 and none of its anchor's is near
            after_sub, before_sub = within, within - 1
        else:
            own = torch.gather(ids.sub, 1, anchor_ids)
            after_sub = own + within * _sub_gap(ids, anchor_ids, above=True)
            before_sub = None if before is None else own - (1 - within) * _sub_gap(ids, anchor_ids, above=False)
        numbered = torch.ones(batch, count, dtype=torch.bool, device=slots.device) if valid is None else valid
        if request.inserted_ranks is None and len(set(request.layout.num_visual)) == 1:  # ranks continue after V
            rank = numbered.cumsum(dim=1) + (request.layout.num_visual[0] - 1)
        else:
            rank = request.next_rank[:, None] + numbered.cumsum(dim=1) - 1
        added = numbered.sum(dim=1)
        request.inserted_ranks = added if request.inserted_ranks is None else request.inserted_ranks + added
        columns = {
            "prompt": torch.gather(ids.prompt, 1, anchor_ids),
            "rank": rank if valid is None else rank.masked_fill(~valid, -1),
            "position_rank": torch.gather(ids.position_rank, 1, source_ids),
            "valid": numbered,
            "position": torch.gather(ids.position, 1, source_ids),
        }
        if not base_cut:
            columns["anchor"] = torch.gather(ids.anchor, 1, anchor_ids)
            columns["sub"] = after_sub if before is None else torch.where(before, before_sub, after_sub)
        ids.append(**columns)
        key = anchor_slots + within if before is None else anchor_slots + (within - before.double())
        return key if valid is None else key.masked_fill(~valid, float("inf"))

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
            first = request.position_ids0
            if request.unpadded and not padded and (first is None or first.dim() == 2):  # every token real: count up
                start = 0 if first is None else first[:, :1]
                position_ids = (start + torch.arange(new_slots.shape[1], device=hidden.device)).expand(
                    hidden.shape[0], -1
                )
            else:
                position_ids = _compact_positions(first, base_valid, valid)
            position_embeddings = self.adapter.position_embeddings(hidden, position_ids)
            shift = base_valid.sum(1) - valid.sum(1)
        else:
            source = request.slot_values("position", -1) if inserted else new_slots
            position_ids = None
            if request.position_ids0 is not None:
                position_ids = _gather_seq(request.position_ids0, source, padded)
            position_embeddings = _gather_embeddings(request.position_embeddings0, source, padded)
        request.segments.append(
            {
                "layer": self.stages[stage_index].layer,
                "slots": new_slots,
                "anchor": anchor,
                "sub": sub,
                "shift": shift,
                "padded": padded,
                "inserted": inserted,
            }
        )
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
            cached[id(mask)] = (
                mask,
                _select_mask(mask, anchor, sub, anchor, sub, prefill=True, padded=segment["padded"]),
            )
        return cached[id(mask)][1]


def _rank_slots(slot_rank: torch.Tensor, bound: int) -> torch.Tensor:
    """(B, bound + 2) the slot holding each visual rank 0..bound-1, given the rank of every slot (B, N) (-1: not
    visual); 0 for a rank no slot holds (column bound + 1 collects the other slots)."""
    batch, length = slot_rank.shape
    index = slot_rank.masked_fill(slot_rank < 0, bound + 1)
    table = torch.zeros(batch, bound + 2, dtype=torch.long, device=slot_rank.device)
    return table.scatter_(1, index, torch.arange(length, device=slot_rank.device).expand(batch, length))


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


def _assemble(
    hidden: torch.Tensor, source: torch.Tensor, new_slots: torch.Tensor, decision: Kept, request: _Request, padded: bool
) -> torch.Tensor:
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
