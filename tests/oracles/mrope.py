"""Independent reference for pruning Qwen-VL models (3-D mRoPE): the decoder layers run by hand and the visual
tokens that are not kept are physically removed, each kept token keeping its own (t, h, w) position from the
model's `get_rope_index`; generated tokens continue at prompt length + step + rope delta on all three axes.
FastV's selection is recomputed here from the layer's own projections (the last prompt token's attention in
layer K-1, mean over heads), not taken from vtprune. Single sample, no batch padding.

Qwen3-VL: `deepstack` adds the vision tower's intermediate features to the visual tokens' hidden states after
the first decoder layers; here they are added to the tokens still present (the kept ones).
"""

from __future__ import annotations

import importlib

import torch


def _embed(model, inputs, ids):
    base = model.model
    embeds = base.get_input_embeddings()(ids)
    config = model.config
    deepstack = None  # per layer, (number of visual tokens, D) in sequence order
    visual = ids[0] == -1
    rank = torch.cumsum((ids[0] == config.image_token_id) | (ids[0] == config.video_token_id), 0) - 1
    for key, grid, token, fn in (
        ("pixel_values", "image_grid_thw", config.image_token_id, base.get_image_features),
        ("pixel_values_videos", "video_grid_thw", config.video_token_id, base.get_video_features),
    ):
        if key not in inputs:
            continue
        out = fn(inputs[key], inputs[grid], return_dict=True)
        features = torch.cat(list(out.pooler_output))
        where = ids[0] == token
        embeds[0, where] = features.to(embeds.dtype)
        visual |= where
        stack = getattr(out, "deepstack_features", None)
        if stack is not None:
            total = int(((ids[0] == config.image_token_id) | (ids[0] == config.video_token_id)).sum())
            if deepstack is None:
                deepstack = [features.new_zeros(total, features.shape[-1]) for _ in stack]
            for layer, per_item in zip(deepstack, stack):
                layer[rank[where]] = torch.cat(list(per_item)).to(layer.dtype)
    return embeds, visual, deepstack


def _rope(model, inputs, ids):
    kwargs = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw") if k in inputs}
    positions, deltas = model.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"], **kwargs)
    return positions, deltas  # (3, 1, N), (1, 1)


def fastv_keep(model, layer_index, hidden, positions, visual_now, keep):
    """Ranks (among the visual tokens present, in order) of the top-`keep` by the last token's head-mean attention
    inside decoder layer `layer_index`, from its input `hidden` (1, n, D)."""
    lm = model.model.language_model
    layer = lm.layers[layer_index]
    module = importlib.import_module(type(layer).__module__)
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden)
    n, d = normed.shape[1], attn.head_dim
    q = attn.q_proj(normed).view(1, n, -1, d)
    k = attn.k_proj(normed).view(1, n, -1, d)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = lm.rotary_emb(hidden, positions)
    q, k = module.apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q[0, :, -1:].float() @ k[0].float().transpose(1, 2)) * attn.scaling
    row = torch.softmax(logits, dim=-1).mean(dim=0)[0]
    scores = row[visual_now]
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:keep]).values, scores


def oracle_logits(model, inputs, stages, new_tokens=None, fastv=None):
    """Logits at every position kept, for `stages` [(layer, kept visual ranks)] or, with fastv=(layer, keep),
    FastV's own selection computed here. Returns (logits, kept ranks per stage)."""
    lm = model.model.language_model
    prompt_ids = inputs["input_ids"]
    n_prompt = prompt_ids.shape[1]
    positions, deltas = _rope(model, inputs, prompt_ids)
    ids = prompt_ids
    if new_tokens is not None and new_tokens.shape[1]:
        ids = torch.cat([prompt_ids, new_tokens], dim=1)
        steps = torch.arange(n_prompt, ids.shape[1]) + deltas.flatten()[0]
        positions = torch.cat([positions, steps.view(1, 1, -1).expand(3, 1, -1)], dim=2)
    hidden, visual, deepstack = _embed(model, inputs, ids)
    rank = torch.full_like(ids[0], -1)
    rank[visual] = torch.arange(int(visual.sum()))
    alive = torch.arange(ids.shape[1])
    eager = model.config.text_config._attn_implementation == "eager"
    cuts = dict(stages)
    if fastv is not None:
        cuts = {}
    kept_record = []
    for index, layer in enumerate(lm.layers):
        if fastv is not None and index == fastv[0]:
            prompt_rows = alive < n_prompt
            keep, _ = fastv_keep(model, index - 1, previous[:, prompt_rows], positions_prev[:, :, prompt_rows],
                                 (rank[alive] >= 0)[prompt_rows], fastv[1])
            cuts[index] = keep
        if index in cuts:
            r = rank[alive]
            keep = (r < 0) | torch.isin(r, cuts[index])
            hidden, alive, positions = hidden[:, keep], alive[keep], positions[:, :, keep]
            kept_record.append((index, cuts[index]))
        previous, positions_prev = hidden, positions
        cos, sin = lm.rotary_emb(hidden, positions)
        n = hidden.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        mask = torch.where(causal, 0.0, torch.finfo(hidden.dtype).min)[None, None] if eager else None
        hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=None)
        if deepstack is not None and index < len(deepstack):
            present = rank[alive] >= 0
            hidden[0, present] = hidden[0, present] + deepstack[index][rank[alive][present]].to(hidden.dtype)
    return model.lm_head(lm.norm(hidden)), kept_record
