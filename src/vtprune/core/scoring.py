"""Attention rows recomputed from a decoder layer's inputs.

Pruning methods need only a few rows of one layer's attention matrix (FastV: the last token's row). Asking
the model for attention weights would force eager attention everywhere and materialise (B, H, N, N)
matrices; instead the queries are projected for the chosen rows only, the keys are either taken from the
layer's own key projection while it ran (exact, and free) or projected from its input, the family's RoPE is
applied exactly as the layer does (the adapter knows how), and the softmax runs over the keys each query may
see. This works whatever attention kernel the model runs (eager, sdpa, flash).
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters.base import ModelAdapter


@torch.no_grad()
def rotated_queries(
    adapter: ModelAdapter,
    layer: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_index: torch.Tensor | None,
    projected: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, H, Q, d) queries of the rows `query_index` (B, Q) of `layer` (None: the last row of every sample, Q = 1),
    with RoPE at those rows' positions: taken from the query projection's output `projected` (B, N, H*d) captured
    while the layer ran on this input, or else projected from its input `hidden_states` (B, N, D, before the input
    layernorm). rows: (B, 1) arange(B), when the caller has it (then each row is taken by one index op)."""
    batch = hidden_states.shape[0]
    if query_index is not None and rows is None:
        rows = torch.arange(batch, device=query_index.device)[:, None]

    def take(values: torch.Tensor) -> torch.Tensor:  # (B, Q, X) of (B or 1, N, X)
        if query_index is None:
            return values[:, -1:]
        return (values if values.shape[0] == batch else values.expand(batch, -1, -1))[rows, query_index]

    if projected is not None and projected.shape[:2] == hidden_states.shape[:2]:
        queries = adapter.shape_queries(layer, take(projected))
    else:
        queries = adapter.project_queries(layer, take(layer.input_layernorm(hidden_states)))
    if query_index is None:  # (b, 1, d) broadcast over the batch
        return adapter.rotate(queries, *(t[:, -1:] for t in position_embeddings))
    cos, sin = position_embeddings
    return adapter.rotate(queries, take(cos), take(sin))


@torch.no_grad()
def rotated_keys(
    adapter: ModelAdapter,
    layer: nn.Module,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    *,
    hidden_states: torch.Tensor | None = None,
    projected: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, Hkv, N, d) keys of every token of `layer` with RoPE: from the key projection's output `projected`
    (B, N, Hkv*d) captured while the layer ran, or else computed from the layer's input `hidden_states`."""
    if projected is None:
        projected = adapter.key_projection(layer)(layer.input_layernorm(hidden_states))
    keys = adapter.shape_keys(layer, projected)
    cos, sin = (t.expand(keys.shape[0], -1, -1) for t in position_embeddings)
    return adapter.rotate(keys, cos, sin)


@torch.no_grad()
def attention_probs(
    layer: nn.Module, queries: torch.Tensor, keys: torch.Tensor, blocked: torch.Tensor | None
) -> torch.Tensor:
    """(B, H, Q, N) float32 softmax of queries (B, H, Q, d) against keys (B, Hkv, N, d) over the keys each query
    may see: `blocked` (B, 1, Q or 1, N) bool marks the others (None: none); grouped-query heads share their key
    head, as in the layer."""
    batch, heads, num_queries, head_dim = queries.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    # one bmm over (sample, kv head): each kv head's query heads and rows grouped as (heads / kv heads) * Q rows
    grouped = queries.reshape(batch * kv_heads, heads // kv_heads * num_queries, head_dim).float()
    flat_keys = keys.reshape(batch * kv_heads, length, head_dim).float()
    logits = torch.bmm(grouped, flat_keys.transpose(1, 2)) * layer.self_attn.scaling
    logits = logits.view(batch, heads, num_queries, length)
    if blocked is not None:
        logits = logits.masked_fill(blocked, float("-inf"))
    return torch.softmax(logits, dim=-1)


@torch.no_grad()
def attention_rows(
    adapter: ModelAdapter,
    layer: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_index: torch.Tensor,
    key_allowed: torch.Tensor,
    projected_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities of some query rows inside `layer`.

    hidden_states: (B, N, D) input of the decoder layer (before its input layernorm).
    position_embeddings: (cos, sin), each (B or 1, N, head_dim), as the layer receives them.
    query_index: (B, Q) long, positions of the query rows in the sequence.
    key_allowed: (B, Q, N) bool, which keys each query row may attend to (causality and padding), or None.
    projected_keys: the layer's key-projection output (B, N, Hkv*d), if captured; else recomputed.
    Returns (B, H, Q, N) float32 probabilities; each row sums to 1 over its allowed keys.
    """
    queries = rotated_queries(adapter, layer, hidden_states, position_embeddings, query_index)
    keys = rotated_keys(adapter, layer, position_embeddings, hidden_states=hidden_states, projected=projected_keys)
    blocked = None if key_allowed is None else ~key_allowed[:, None]
    return attention_probs(layer, queries, keys, blocked)


__all__ = ["rotated_queries", "rotated_keys", "attention_probs", "attention_rows"]
