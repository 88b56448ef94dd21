"""Independent reference ("oracle") for HiMAP, written from the official code, not from vtprune.

Sources (pinned):
- HiMAP, github.com/ustc-hyin/HiMAP @ 6c279e7 (the commit pinned as a submodule by intcomp/attention-bias):
  src/LLaVA/llava/model/language_model/himap.py, ``Himap_LlamaModel.forward`` (the pruning loop) and
  himap_modeling_llama.py, ``LlamaAttention.forward`` (eager attention whose weights the loop reads).
- Debiasing patch, github.com/intcomp/attention-bias @ 91af77b: patches/HiMAP.patch (weights and padding mask,
  first stage only) and scripts/HiMAP/*.sh (layers 2 / 8, keeps 115 / 90, sys-length 35, img-length 576).

HiMAP on one sample, as the official loop does it (layer indices are 0-based decoder layers):
- before decoder layer ``layers[0]`` (TXT_LAYER): take the attention probabilities of layer ``layers[0] - 1``
  (the layer's own softmax(QK^T/sqrt(d) + causal mask) over all keys, RoPE at the current position ids),
  average over heads, and sum over the query rows of every token after the image up to the end of the
  sequence (the system prompt before the image is not a query; the last token is) the columns of the image
  tokens: score_i = sum_{q after image} mean_h A[h, q, i]. Keep the ``keeps[0]`` highest (top-k), in prompt
  order; drop the rest of the image tokens.
- before decoder layer ``layers[1]`` (IMG_LAYER): take the attention probabilities of layer ``layers[1] - 1``
  (computed on the already shortened sequence), average over heads, and sum over the rows of the remaining
  image tokens the columns of the remaining image tokens (attention each image token receives from the image
  tokens; softmax was over all keys, nothing is renormalised). Keep the ``keeps[1]`` highest.
- kept tokens keep their original position ids (``position_ids = txt_keep_indexs`` and then
  ``txt_keep_indexs[img_keep_indexs]``): ``positions="original"`` is the official default.
- debiasing (attention-bias patch), first stage only: score *= padding mask (0 where the patch's padded
  fraction > 0.5), then score *= weight vector indexed by the visual index; top-k count NOT lowered.
"""

from __future__ import annotations


import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .common import OracleResult


def _attention_probs(layer, hidden, rotary_emb, positions):
    """Softmax attention probabilities (1, heads, n, n) float32 of ``layer`` on its input ``hidden``.

    Recomputes what the official eager ``LlamaAttention.forward`` returns as ``attn_weights``
    (himap_modeling_llama.py): input RMSNorm of the decoder layer, q/k projections, RoPE at the
    current position ids, GQA key repetition, scale 1/sqrt(head_dim), causal mask, softmax over all keys.
    """
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    n = x.shape[1]
    q = attn.q_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
    cos, sin = rotary_emb(hidden, positions[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    q, k = q.float(), k.float()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # repeat_kv: each kv head serves a group of q heads
    logits = q @ k.transpose(-1, -2) * attn.scaling
    causal = torch.ones(n, n, dtype=torch.bool, device=hidden.device).tril()
    logits = logits.masked_fill(~causal, float("-inf"))
    return logits.softmax(dim=-1)


def _top(score: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """``score.topk(k)`` over the candidate visual indices, returned sorted ascending (the official code sorts
    the kept sequence indices). Ties (e.g. zeroed padding tokens) go to the lower visual index."""
    order = torch.sort(score[candidates], descending=True, stable=True).indices
    return torch.sort(candidates[order[:k]]).values


def _run(model, ids, pixel_values, prompt_len, layers, keeps, weights, padding, positions, fixed=None):
    """One pass over ``ids`` with the decoder layers run by hand. Selections are made here unless ``fixed``
    (the kept sets of a previous prompt-only pass) is given."""
    base = model.model
    lm = base.language_model
    image_token = model.config.image_token_id

    # embeddings with the image features scattered into the <image> slots (LlavaModel.forward)
    embeds = base.get_input_embeddings()(ids)
    is_image = ids[0] == image_token
    V = int(is_image.sum())
    if V == 0:
        raise ValueError("no image tokens in the prompt")
    feats = torch.cat(list(base.get_image_features(pixel_values=pixel_values).pooler_output))
    embeds[0, is_image] = feats.to(embeds.dtype)
    visual_rank = torch.full_like(ids[0], -1)
    visual_rank[is_image] = torch.arange(V, device=ids.device)
    last_image = int(torch.nonzero(is_image).max())

    idx = torch.arange(ids.shape[1], device=ids.device)  # original sequence index of each token still present
    pos = idx.clone()  # position ids used for RoPE
    hidden = embeds
    eager = model.config._attn_implementation == "eager"
    present = torch.ones(V, dtype=torch.bool, device=ids.device)
    kept, scores, ranked = [], [], []

    stage_of = {layer: s for s, layer in enumerate(layers)}
    probs = None
    for li, layer in enumerate(lm.layers):
        if li in stage_of:
            s = stage_of[li]
            rank = visual_rank[idx]
            a = probs.mean(dim=1)[0]  # torch.mean(layer_attn, dim=1)[0]: mean over heads, batch 0
            score = torch.full((V,), float("nan"), dtype=torch.float32, device=ids.device)
            if s == 0:
                # himap.py, idx == TXT_LAYER: rows SYS+IMG: (every token after the image, to the end),
                # columns SYS:SYS+IMG (the image), summed over rows.
                rows = idx > last_image
                cols = rank >= 0
                score[rank[cols]] = a[rows][:, cols].sum(dim=0)
                # HiMAP.patch: pad mask (threshold 0.5) then weight vector, on this stage only; keep not lowered
                ranking = score.clone()
                if padding is not None:
                    ranking = ranking * (~padding.to(ranking.device)).to(ranking.dtype)
                if weights is not None:
                    ranking = ranking * weights.to(ranking.device, torch.float32)
            else:
                # himap.py, idx == IMG_LAYER: rows and columns SYS:SYS+TXT_ATTN_RANK (remaining image tokens),
                # summed over rows; no debiasing in the patch.
                cols = rank >= 0
                score[rank[cols]] = a[cols][:, cols].sum(dim=0)
                ranking = score.clone()
            candidates = torch.nonzero(present).flatten()
            chosen = fixed[s] if fixed is not None else _top(ranking, candidates, keeps[s])
            present = torch.zeros_like(present)
            present[chosen] = True
            kept.append(chosen)
            scores.append(score)
            ranked.append(ranking)
            # cut: keep every non-image token and the chosen image tokens, in sequence order
            keep = (rank < 0) | present[rank.clamp(min=0)]
            hidden, idx, pos = hidden[:, keep], idx[keep], pos[keep]
            if positions == "compact":
                # renumber the (shortened) prompt 0..n-1; appended tokens keep the original numbering
                in_prompt = idx < prompt_len
                pos = torch.where(in_prompt, torch.cumsum(in_prompt.long(), 0) - 1, idx)
            elif positions != "original":
                raise ValueError(f"positions must be 'original' or 'compact', not {positions!r}")
        if li + 1 in stage_of:  # the next stage reads this layer's attention probabilities
            probs = _attention_probs(layer, hidden, lm.rotary_emb, pos)
        cos, sin = lm.rotary_emb(hidden, pos[None])
        n = hidden.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=hidden.device).tril()
        mask = torch.where(causal, 0.0, torch.finfo(hidden.dtype).min)[None, None].to(hidden.dtype) if eager else None
        hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos[None])
    logits = model.lm_head(lm.norm(hidden)).float()
    return kept, scores, ranked, logits, pos


@torch.no_grad()
def oracle_himap(
    model,
    inputs,
    *,
    layers,
    keeps,
    weights=None,
    padding=None,
    positions="original",
    new_tokens=None,
    reselect_per_step=False,
) -> OracleResult:
    """HiMAP (ustc-hyin/HiMAP, himap.py ``Himap_LlamaModel.forward``) on one sample, tokens dropped by hand.

    layers: ``[shallow_layer, deep_layer]``, the decoder layers BEFORE which image tokens are removed
        (official TXT_LAYER=2, IMG_LAYER=8); 0 < shallow_layer < deep_layer.
        Stage 1 ranks by the attention probabilities of layer ``shallow_layer - 1``: head mean, summed over the
        query rows of all tokens after the image (to the end of the sequence, last token included), image
        columns. Stage 2 ranks by the attention probabilities of layer ``deep_layer - 1`` (on the shortened
        sequence): head mean, summed over the rows of the remaining image tokens, remaining image columns.
    keeps: ``[k1, k2]`` numbers of image tokens present after each stage (official 115, 90); k1 >= k2.
    weights: (V,) multiplicative debias weights, applied (with ``padding``) to the stage-1 score only, as
        patches/HiMAP.patch does; ``padding``: (V,) bool, True = padding, its score zeroed; keep count unchanged.
    positions: "original" (official) or "compact".
    new_tokens: (1, T) tokens appended after the prompt; selection from the prompt alone, then replayed.
    reselect_per_step: method specific, default False. True mimics the official runs literally
        (``generate(use_cache=False)``, the whole pruned forward is redone for every generated token): the
        selection is recomputed on prompt + new_tokens, so the appended tokens are stage-1 queries too.

    Returns OracleResult; ``extra`` has "ranking" (per stage: the score actually ranked, i.e. after debiasing at
    stage 1) and "position_ids" (final sequence).
    """
    layers, keeps = [int(x) for x in layers], [int(x) for x in keeps]
    if len(layers) != 2 or len(keeps) != 2:
        raise ValueError("HiMAP has exactly two stages: layers=[shallow, deep], keeps=[k1, k2]")
    if not 0 < layers[0] < layers[1]:
        raise ValueError("need 0 < shallow layer < deep layer (himap.py asserts)")
    if keeps[0] < keeps[1]:
        raise ValueError("need keeps[0] >= keeps[1] (himap.py asserts)")
    ids = inputs["input_ids"]
    assert ids.shape[0] == 1, "oracle handles batch size 1"
    if layers[1] >= len(model.model.language_model.layers):
        raise ValueError("the deep layer must be a decoder layer of the model")
    prompt_len = ids.shape[1]
    pixels = inputs["pixel_values"]
    args = (prompt_len, layers, keeps, weights, padding, positions)
    # the selection, made from the prompt alone (a prefill)
    kept, scores, ranked, logits, pos = _run(model, ids, pixels, *args)
    if new_tokens is not None:
        full = torch.cat([ids, new_tokens.to(ids.device)], dim=1)
        if reselect_per_step:  # official use_cache=False generation: select again with the new tokens as queries
            kept, scores, ranked, logits, pos = _run(model, full, pixels, *args)
        else:  # replay prompt + new tokens with the prefill's selection (what a KV-cache decode step computes)
            logits, pos = _run(model, full, pixels, *args, fixed=kept)[3:]
    return OracleResult(
        kept=[k.long().cpu() for k in kept],
        scores=[s.float().cpu() for s in scores],
        logits=logits,
        extra={"ranking": [r.float().cpu() for r in ranked], "position_ids": pos.cpu()},
    )
