"""The KV cache after a prefill: trimming the layers before a first stage that trims the cache, and decode steps
(the mask columns, and positions, that match what each layer's cache holds)."""

from __future__ import annotations

import torch

from .masks import _select_mask
from .request import _Ids, _Request


class _CacheCuts:
    """PruningSession's part that trims the KV cache and serves decode steps."""

    def _on_language_model_output(self, module, args, output):
        """After a prefill whose first stage trims the cache: the layers before that stage keep only the tokens
        it kept, and decoding treats the cut sequence as the language model's input (as after a layer-0 cut)."""
        request = self._request
        if request is None or request.phase != "prefill" or not request.segments or request.cache is None:
            return None
        segment = request.segments[0]
        slots, ids = segment["slots"], request.ids
        if segment["inserted"]:
            raise ValueError("a stage that trims the cache cannot insert tokens (they have no keys in earlier layers)")
        index = slots.clamp(min=0)
        for layer in range(self.stages[0].layer):  # their cache still holds the base sequence, in order
            cached = request.cache.layers[layer]
            columns = index[:, None, :, None].expand(-1, cached.keys.shape[1], -1, cached.keys.shape[-1])
            cached.keys = torch.gather(cached.keys, 2, columns)
            cached.values = torch.gather(cached.values, 2, columns.expand(-1, -1, -1, cached.values.shape[-1]))
        valid = ids.at("valid", slots, False)
        batch, length = slots.shape
        request.base_prompt_columns = ids.at("prompt", slots, -1)
        # the trimmed layers cached their keys at the prompt's own positions: decode continues those there (no
        # base shift); with compact numbering the layers from the cut on continue the renumbered sequence
        dropped = request.valid0.sum(1) - valid.sum(1)
        inverse = torch.full((batch, ids.size), -1, dtype=torch.long, device=slots.device)
        inverse.scatter_(1, index, torch.arange(length, device=slots.device).expand(batch, length).clone())
        identity = torch.arange(length, device=slots.device).expand(batch, length).clone()
        later = []
        if segment["shift"] is not None:
            later.append(
                dict(segment, slots=identity, anchor=torch.where(valid, identity, -1), sub=None, shift=dropped)
            )
        for other in request.segments[1:]:  # re-expressed over the trimmed sequence
            anchor = torch.where(other["anchor"] >= 0, torch.gather(inverse, 1, other["anchor"].clamp(min=0)), -1)
            later.append(dict(other, anchor=anchor))
        request.segments = later
        request.ids = _Ids.base(request.base_prompt_columns, ids.at("rank", slots, -1), valid)
        request.base_len = length
        return None

    def _decode_language_model_input(self, request: _Request, kwargs):
        """A decode step after a layer-0 cut: the 2-D mask and positions over what the cache holds."""
        query_len, generated = request.step["query_len"], request.step["generated"]
        batch, device = request.slots.shape[0], request.slots.device
        tail = torch.arange(request.prompt_len, request.prompt_len + generated + query_len, device=device)
        columns = torch.cat([request.base_prompt_columns, tail.expand(batch, -1)], dim=1)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            mask = torch.gather(mask, 1, columns.clamp(min=0)).masked_fill(columns < 0, 0)
        else:
            mask = torch.cat(
                [
                    request.ids.valid[:, : request.base_len].long(),
                    torch.ones(batch, generated + query_len, dtype=torch.long, device=device),
                ],
                dim=1,
            )
        position_ids = kwargs.get("position_ids")
        if position_ids is None:  # what the unpruned model would have used
            position_ids = (request.prompt_len + generated + torch.arange(query_len, device=device)).expand(batch, -1)
        if request.base_shift_applies:
            shift = request.base_shift
            position_ids = position_ids - (shift if isinstance(shift, int) else shift[:, None])
        return (), dict(kwargs, attention_mask=mask, position_ids=position_ids)

    def _decode_layer(self, index: int, request: _Request, args, kwargs):
        applicable = [i for i, segment in enumerate(request.segments) if segment["layer"] <= index]
        if not applicable:
            return None
        segment_index = applicable[-1]
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = kwargs.get("attention_mask")
        key = (segment_index, id(mask))  # layers of different attention types have different masks
        if key not in request.step:
            request.step[key] = self._decode_inputs(segment_index, index, request, kwargs, hidden)
        return args, dict(kwargs, **request.step[key])

    def _decode_inputs(self, segment_index: int, index: int, request: _Request, kwargs, hidden) -> dict:
        """Mask (and, with compact positions, positions and RoPE tables) for the new queries of a decode step
        over what layer `index`'s cache holds."""
        segment = request.segments[segment_index]
        generated, query_len = request.step["generated"], hidden.shape[1]
        slots = segment["slots"]
        cached = request.cache.layers[index].keys.shape[-2]
        if cached != slots.shape[1] + generated:
            raise RuntimeError(
                f"layer {index} of the KV cache holds {cached} tokens, expected {slots.shape[1] + generated}: "
                "the cache was changed outside vtprune's engine."
            )
        batch, device = slots.shape[0], slots.device
        tail = torch.arange(request.base_len, request.base_len + generated + query_len, device=device).expand(batch, -1)
        cols = torch.cat([segment["anchor"], tail], dim=1)
        rows = tail[:, tail.shape[1] - query_len :]  # new tokens share no base position with the prompt's: no sub order
        out = {
            "attention_mask": _select_mask(
                kwargs.get("attention_mask"), rows, None, cols, None, prefill=False, padded=segment["padded"]
            )
        }
        if segment["shift"] is not None:  # compact: continue the segment's own numbering
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                position_ids = (request.base_len + generated + torch.arange(query_len, device=device)).expand(batch, -1)
            position_ids = position_ids - segment["shift"][:, None]
            out["position_ids"] = position_ids
            out["position_embeddings"] = self.adapter.position_embeddings(hidden, position_ids)
        return out


def _cache_kwarg(kwargs: dict):
    """The KV cache a forward receives: `cache` since transformers 5.24, `past_key_values` before."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")
