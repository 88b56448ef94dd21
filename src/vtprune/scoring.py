"""Attention rows recomputed from a decoder layer's inputs.

Pruning methods need only a few rows of one layer's attention matrix (FastV: the last token's row). Asking
the model for attention weights would force eager attention everywhere and materialise (B, H, N, N)
matrices; instead we recompute q for the chosen query rows and k for all tokens from the layer's own input,
apply the family's RoPE exactly as the layer does, and softmax over the keys each query may see. This costs
O(N * hidden) per layer and works whatever attention kernel the model runs (eager, sdpa, flash).
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters.base import ModelAdapter


@torch.no_grad()
def attention_rows(
    adapter: ModelAdapter,
    layer: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_index: torch.Tensor,
    key_allowed: torch.Tensor,
) -> torch.Tensor:
    """Attention probabilities of some query rows inside `layer`.

    hidden_states: (B, N, D) input of the decoder layer (before its input layernorm).
    position_embeddings: (cos, sin), each (B or 1, N, head_dim), as the layer receives them.
    query_index: (B, Q) long, positions of the query rows in the sequence.
    key_allowed: (B, Q, N) bool, which keys each query row may attend to (causality and padding).
    Returns (B, H, Q, N) float32 probabilities; each row sums to 1 over its allowed keys.
    """
    attn = layer.self_attn
    batch, length, _ = hidden_states.shape
    head_dim = attn.head_dim
    normed = layer.input_layernorm(hidden_states)
    rows = torch.gather(normed, 1, query_index[:, :, None].expand(-1, -1, normed.shape[-1]))  # (B, Q, D)

    query = attn.q_proj(rows).view(batch, rows.shape[1], -1, head_dim).transpose(1, 2)  # (B, H, Q, d)
    key = attn.k_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)  # (B, Hkv, N, d)

    cos, sin = position_embeddings
    cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
    index = query_index[:, :, None].expand(-1, -1, cos.shape[-1])
    query = adapter.rotate(query, torch.gather(cos, 1, index), torch.gather(sin, 1, index))
    key = adapter.rotate(key, cos, sin)

    groups = query.shape[1] // key.shape[1]
    query = query.reshape(batch, key.shape[1], groups * query.shape[2], head_dim)  # heads grouped by kv head
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scaling  # (B, Hkv, G*Q, N)
    logits = logits.reshape(batch, -1, query_index.shape[1], length)  # (B, H, Q, N)
    logits = logits.masked_fill(~key_allowed[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1)
