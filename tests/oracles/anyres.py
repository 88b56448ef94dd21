"""Independent reference for LLaVA-NeXT-style models (anyres tiles + image_newline tokens, 1-D positions): the
decoder layers run by hand, the visual tokens not kept physically removed (kept tokens keep their positions, as
FastV does), the newline tokens always kept. Which image tokens are newlines is read from the encoded features
(rows equal to the model's `image_newline`), not from vtprune's layout arithmetic. FastV's selection is
recomputed here (`mrope.fastv_keep`). Single sample, no batch padding."""

from __future__ import annotations

import torch

from .mrope import fastv_keep


def oracle_logits(model, inputs, stages, new_tokens=None, fastv=None):
    base = model.model
    lm = base.language_model
    prompt = inputs["input_ids"]
    n_prompt = prompt.shape[1]
    ids = prompt if new_tokens is None else torch.cat([prompt, new_tokens], dim=1)
    hidden = base.get_input_embeddings()(ids)
    features = torch.cat(list(base.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output))
    is_image = ids[0] == model.config.image_token_id
    hidden[0, is_image] = features
    newline = (features == base.image_newline).all(dim=-1)
    visual = is_image.clone()
    visual[is_image] = ~newline
    logits, record = run_1d(model, hidden, visual, n_prompt, stages, fastv)
    return logits, record, newline


def run_1d(model, hidden, visual, n_prompt, stages, fastv=None):
    """The decoder by hand on embeddings `hidden` (1, N, D) with 1-D positions; `visual` (N,) marks the prunable
    visual tokens (ranked in order); stages [(layer, kept ranks)] or fastv=(layer, keep) chosen here."""
    lm = model.model.language_model
    rank = torch.full(visual.shape, -1, dtype=torch.long)
    rank[visual] = torch.arange(int(visual.sum()))
    alive = torch.arange(hidden.shape[1])
    eager = model.config.text_config._attn_implementation == "eager"
    cuts, record = dict(stages), []
    for index, layer in enumerate(lm.layers):
        if fastv is not None and index == fastv[0]:
            rows = alive < n_prompt
            keep, _ = fastv_keep(model, index - 1, previous[:, rows], alive[rows][None], (rank[alive] >= 0)[rows], fastv[1])
            cuts[index] = keep
        if index in cuts:
            r = rank[alive]
            keep = (r < 0) | torch.isin(r, cuts[index])
            hidden, alive = hidden[:, keep], alive[keep]
            record.append((index, cuts[index]))
        previous = hidden
        cos, sin = lm.rotary_emb(hidden, alive[None])
        n = hidden.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        mask = torch.where(causal, 0.0, torch.finfo(hidden.dtype).min)[None, None] if eager else None
        hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=alive[None])
    return model.lm_head(lm.norm(hidden)), record
