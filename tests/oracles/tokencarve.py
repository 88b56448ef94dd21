"""Independent reference ("oracle") for TokenCarve, written from the official code, not from vtprune.

Sources (pinned):
- TokenCarve (Tan et al., arXiv 2503.10501), github.com/ShawnTan86/TokenCarve @ a57bd59 (the commit pinned as the
  `TokenCarve` submodule of intcomp/attention-bias): TokenCarve/modeling_llama.py
  ``LlamaModel.forward`` (branch ``elif layer_idx == Token_carve_work_layer``: scores, fusion, merge, cut, cache
  trim) and ``LlamaAttention.forward`` (``keep_index_map``: RoPE positions after the cut);
  TokenCarve/TokenCarve_model_vqa_loader.py (``image_token_rank = int(nums / 2 * 3)``,
  ``merge_token_nums = int(nums / 2)``).
- Debias patch, github.com/intcomp/attention-bias @ 91af77b: patches/TokenCarve.patch (padding mask at
  threshold 0.5 and the weight vector, both multiplied into the AV score only) and scripts/TokenCarve/*.sh
  (work layer 2, 64 tokens, sys length 36, SV-AV mode 0, SV-AV weight 0.5). Notes: /work/notes/tokencarve.md.

TokenCarve on one sample (decoder layer indices are 0-based; ``layer`` is the layer BEFORE which tokens are cut):
1. AV: the eager attention probabilities of decoder layer ``layer - 1`` (softmax over all keys, causal, RoPE at
   0..n-1), mean over heads, row of the LAST prompt token, image columns.
2. SV: the output hidden states of layer ``layer - 1`` (= the input of ``layer``), image rows, float32;
   ``U, S, Vh = svd(X)``; SV_i = sum_j |(U diag(S))_ij| (L1 norm of row i of U·S).
3. Fusion (Borda): rank the V tokens by AV and by SV (descending); the token of rank r (0-based) gets
   (V - r) * av_weight points from AV and (V - r) * (1 - av_weight) from SV; fused = sum. Candidates = the
   ``candidates`` highest fused scores, in descending fused order.
4. Merge: A = the first ``candidates // 2`` candidates, B = the rest. Cosine similarity of the layer ``layer-1``
   output hidden states; each B token's best A match (max similarity); the ``candidates - keep`` B tokens with the
   highest best-match similarity are merged into their A match:
   h_a <- (h_a + sum of its merged h_b) / (1 + number merged into a)   (scatter_reduce "mean", include_self;
   plain mean, no size weighting). The other B tokens are kept unchanged. Kept = A + unmerged B (``keep`` tokens).
5. Cut before ``layer``: all text tokens + kept visual tokens, merged values written into the A tokens.
   Positions: ORIGINAL (the official attention uses ``keep_index_map[position_ids]``, i.e. the kept tokens'
   prompt indices), so ``positions="original"`` is the official default; "compact" renumbers 0..n-1.
6. KV cache: the official code trims the cache of layers 0..layer-1 to the kept tokens too (``for i in
   range(2): past_key_values.key_cache[i] = ...[:, :, keep_indexs]``), so generated tokens do not see the removed
   visual tokens in ANY layer (``trim_cache=True``). The kept tokens' layer 0..layer-1 keys/values are their
   unmerged, full-context ones. Generated tokens continue the original numbering (prompt length + t).
Debias (patches/TokenCarve.patch): AV *= padding mask (0 where the patch is > 50% padding), then AV *= weights,
before the AV ranking; SV untouched; the candidate / keep counts are NOT lowered.

Deliberate choices where the official code is unspecified or cannot apply:
- Ties (common in the Borda totals, which are multiples of 0.5 with av_weight=0.5, and in a zeroed AV): every
  ranking is a stable descending sort, i.e. ties go to the LOWER visual index (official: CUDA topk/sort, no tie
  order). The same rule orders the B tokens by best-match similarity.
- SVD with ``full_matrices=False`` (same U·S as the official full SVD when V <= hidden size; the official code
  fails otherwise).
- The image is located from the input ids (the official scripts use a fixed system length of 36, one token late
  for the vicuna_v1 prompt; not reproduced).
- Precision: float32 / the model's dtype (the official code runs fp16).
"""

from __future__ import annotations


import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .common import OracleResult


def _attention_probs(layer, hidden, rotary_emb, positions, allowed):
    """Softmax attention probabilities (1, heads, n, n) float32 of decoder ``layer`` on its input ``hidden``.

    What the official eager ``LlamaAttention.forward`` returns as ``attn_weights`` (modeling_llama.py): input
    RMSNorm, q/k projections, RoPE at ``positions``, repeat_kv, scale 1/sqrt(head_dim), mask, softmax over keys.
    ``allowed``: (n, n) bool, True where query i may attend to key j.
    """
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    n = x.shape[1]
    q = attn.q_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
    cos, sin = rotary_emb(hidden, positions[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    q, k = q.float(), k.float()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # repeat_kv
    logits = q @ k.transpose(-1, -2) * attn.scaling
    logits = logits.masked_fill(~allowed, float("-inf"))
    return logits.softmax(dim=-1)


def _descending(score: torch.Tensor) -> torch.Tensor:
    """Indices of ``score`` in descending order; ties -> lower index first."""
    return torch.sort(score, descending=True, stable=True).indices


def _select(av, sv, h_vis, *, keep, candidates, weights, padding, debias_fused, av_weight):
    """Steps 3-4 (fusion, candidates, A/B split, merge pairs). Returns a dict of visual-index tensors."""
    V = av.shape[0]
    ones = torch.ones(V, dtype=torch.float32, device=av.device)
    pad = ones if padding is None else (~padding.to(av.device).bool()).float()
    w = ones if weights is None else weights.to(av.device, torch.float32)
    points = torch.arange(V, 0, -1, device=av.device, dtype=torch.float32)  # Index_weighting = arange(V, 0, -1)

    def borda(av_scores):
        fused = torch.zeros(V, dtype=torch.float32, device=av.device)  # img_token_rank
        fused[_descending(av_scores)] += points * av_weight  # img_token_rank[AV_rank] += Iw * SV_AV_weight
        fused[_descending(sv)] += points * (1 - av_weight)  # img_token_rank[SV_rank] += Iw * (1 - SV_AV_weight)
        return fused

    fused_raw = borda(av)
    if debias_fused:  # variant (not the published patch): debias the fused score instead of AV
        av_ranked = av
        fused = fused_raw * pad * w
    else:  # TokenCarve.patch: AV *= pad mask; AV *= weight; then the AV sort
        av_ranked = av * pad * w
        fused = borda(av_ranked)
    cand = _descending(fused)[:candidates]  # img_token_rank.topk(image_token_rank).indices (descending order)
    half = int(0.5 * candidates)  # set_length
    set_a, set_b = cand[:half], cand[half:]
    n_merge = candidates - keep  # reduce_token_nums = min(set_length, merge_token_nums)
    # similarity_token_merging: cosine of the layer (layer-1) output hidden states
    metric = h_vis / h_vis.norm(dim=-1, keepdim=True)
    sim = metric[set_b] @ metric[set_a].transpose(-1, -2)  # merge_scores = B @ A^T
    best, best_a = sim.max(dim=-1)  # merge_max_values, merge_max_index
    order_b = _descending(best.float())
    merged_b_local = order_b[:n_merge]  # merge_token_indices
    sources = set_b[merged_b_local]  # real_merge_token_indices_B
    destinations = set_a[best_a[merged_b_local]]  # real_merged_token_indices_A
    unmerged_b = set_b[order_b[n_merge:]]  # real_remaining_token_indices
    kept = torch.sort(torch.cat([set_a, unmerged_b])).values
    return dict(
        fused_raw=fused_raw, fused=fused, av_ranked=av_ranked, candidates=cand, set_a=set_a, set_b=set_b,
        sources=sources, destinations=destinations, kept=kept,
    )


def _merge_values(h_vis, sources, destinations):
    """scatter_reduce_(0, A, h[B], reduce="mean") with include_self=True: (h_a + sum h_b) / (1 + count)."""
    values = {}
    for a in torch.unique(destinations).tolist():
        members = sources[destinations == a]
        values[a] = (h_vis[a] + h_vis[members].sum(dim=0)) / (1 + members.numel())
    return values


def _run(model, ids, pixel_values, prompt_len, layer, cfg, fixed=None):
    """One pass over ``ids`` with the decoder layers run by hand. The selection is made here (from the prompt
    alone: ``ids`` must then be the prompt) unless ``fixed`` (a previous prompt-only selection) is given."""
    base = model.model
    lm = base.language_model
    device = ids.device
    embeds = base.get_input_embeddings()(ids)
    is_image = ids[0] == model.config.image_token_id
    V = int(is_image.sum())
    if V == 0:
        raise ValueError("no image tokens in the prompt")
    feats = torch.cat(list(base.get_image_features(pixel_values=pixel_values).pooler_output))
    embeds[0, is_image] = feats.to(embeds.dtype)
    visual_rank = torch.full_like(ids[0], -1)
    visual_rank[is_image] = torch.arange(V, device=device)

    n = ids.shape[1]
    idx = torch.arange(n, device=device)  # original sequence index of each token still present
    pos = idx.clone()
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    allowed = causal.clone()
    if fixed is not None and cfg["trim_cache"]:
        # the official cache of layers < layer holds only the kept tokens: appended tokens cannot see the others
        gone = is_image.clone()
        gone[is_image] = ~torch.isin(torch.arange(V, device=device), fixed["kept"])
        allowed[prompt_len:] &= ~gone[None, :]
    hidden = embeds
    sel = fixed
    av = sv = None
    for li, dec in enumerate(lm.layers):
        if li == layer:
            rank = visual_rank[idx]
            vis_rows = torch.nonzero(rank >= 0).flatten()  # sequence rows of visual 0..V-1 (in prompt order)
            h_vis = hidden[0, vis_rows]
            if sel is None:
                # SVD Value: layer_outputs[0][0].to(float32)[image rows]; U @ diag(S); sum |.| over columns
                x = h_vis.float()
                u, s, _ = torch.linalg.svd(x, full_matrices=False)
                sv = (u * s).abs().sum(dim=1)
                sel = _select(
                    av, sv, h_vis, keep=cfg["keep"], candidates=cfg["candidates"], weights=cfg["weights"],
                    padding=cfg["padding"], debias_fused=cfg["debias_fused"], av_weight=cfg["av_weight"],
                )
            # merge into the A tokens (in place on the hidden states that enter `layer`)
            values = _merge_values(h_vis, sel["sources"], sel["destinations"])
            hidden = hidden.clone()
            for a, value in values.items():
                hidden[0, vis_rows[a]] = value.to(hidden.dtype)
            sel = dict(sel, merged_values=values)
            # cut: text tokens + kept visual tokens, in sequence order (keep_indexs.sort())
            keep_mask = (rank < 0) | torch.isin(rank, sel["kept"])
            hidden, idx, pos = hidden[:, keep_mask], idx[keep_mask], pos[keep_mask]
            if cfg["positions"] == "compact":
                in_prompt = idx < prompt_len  # appended tokens keep the original numbering
                pos = torch.where(in_prompt, torch.cumsum(in_prompt.long(), 0) - 1, idx)
            m = hidden.shape[1]
            allowed = torch.ones(m, m, dtype=torch.bool, device=device).tril()
        if li == layer - 1 and fixed is None:
            # Atten Value: layer_outputs[1] of layer-1, mean over heads, row [-1] (last prompt token), image cols
            probs = _attention_probs(dec, hidden, lm.rotary_emb, pos, allowed)
            row = probs.mean(dim=1)[0, prompt_len - 1]
            av = row[visual_rank >= 0].float()
        cos, sin = lm.rotary_emb(hidden, pos[None])
        mask = torch.where(allowed, 0.0, torch.finfo(hidden.dtype).min)[None, None].to(hidden.dtype)
        hidden = dec(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos[None])
    logits = model.lm_head(lm.norm(hidden)).float()
    return sel, av, sv, logits, pos


@torch.no_grad()
def oracle_tokencarve(
    model,
    inputs,
    *,
    layer: int,
    keep: int,
    candidates: int,
    weights=None,
    padding=None,
    debias_fused: bool = False,
    positions: str = "original",
    new_tokens=None,
    av_weight: float = 0.5,
    trim_cache: bool = True,
) -> OracleResult:
    """TokenCarve (ShawnTan86/TokenCarve, modeling_llama.py ``LlamaModel.forward``) on one sample, by hand.

    layer: the decoder layer BEFORE which the visual tokens are cut (official ``--token-carve-work-layer 2``);
        AV and SV come from layer ``layer - 1``. 1 <= layer < number of decoder layers.
    keep: visual tokens present after the stage (official ``--token-carve-image-token-nums``, 64 in the scripts).
    candidates: tokens kept by the fused ranking before merging (official ``int(keep / 2 * 3)``, 96 for 64);
        ``candidates - keep`` of them (official ``int(keep / 2)``, 32) are merged away; this must not exceed
        ``candidates // 2`` (the size of set A; the official ``min`` would otherwise keep more than ``keep``).
    weights: (V,) positional-debias weights multiplied into AV before its ranking (patches/TokenCarve.patch);
        padding: (V,) bool, True = padding, AV zeroed there. Counts are not lowered.
    debias_fused: variant (not in the patch): apply ``padding`` and ``weights`` to the fused Borda score instead of
        AV (AV and SV then ranked raw).
    positions: "original" (official, RoPE uses the kept tokens' prompt indices) or "compact".
    new_tokens: (1, T) tokens appended after the prompt; the selection and merge are made from the prompt alone,
        then prompt + new tokens are replayed with them (what a KV-cache decode step computes).
    av_weight: official ``--token-carve-SV-AV-weight`` 0.5 (the share of the Borda points given to AV).
    trim_cache: True (official): appended tokens do not see the removed visual tokens in layers < ``layer`` either;
        False: they see the whole prompt there (an untrimmed cache).

    Returns OracleResult with one stage. ``scores[0]`` is the raw fused Borda score (from the raw AV and SV, no
    debiasing). ``extra``: "av" (raw AV), "sv", "av_ranked" (AV after debiasing), "fused" (the fused score that
    was ranked), "candidates" (visual indices in fused order), "set_a", "set_b", "merged" ({source: destination}),
    "merged_values" ([{destination: (D,) hidden state written into it before ``layer``}]), "position_ids".
    """
    ids = inputs["input_ids"]
    assert ids.shape[0] == 1, "oracle handles batch size 1"
    n_layers = len(model.model.language_model.layers)
    if not 1 <= layer < n_layers:
        raise ValueError(f"layer must be in 1..{n_layers - 1}")
    V = int((ids[0] == model.config.image_token_id).sum())
    if not 0 < keep <= candidates <= V:
        raise ValueError(f"need 0 < keep <= candidates <= V={V}")
    if candidates - keep > candidates // 2:
        raise ValueError("candidates - keep (tokens merged away) must not exceed candidates // 2 (set A)")
    if positions not in ("original", "compact"):
        raise ValueError(f"positions must be 'original' or 'compact', not {positions!r}")
    cfg = dict(
        keep=keep, candidates=candidates, weights=weights, padding=padding, debias_fused=debias_fused,
        av_weight=av_weight, positions=positions, trim_cache=trim_cache,
    )
    prompt_len = ids.shape[1]
    pixels = inputs["pixel_values"]
    sel, av, sv, logits, pos = _run(model, ids, pixels, prompt_len, layer, cfg)
    if new_tokens is not None:
        full = torch.cat([ids, new_tokens.to(ids.device)], dim=1)
        _, _, _, logits, pos = _run(model, full, pixels, prompt_len, layer, cfg, fixed=sel)
    cpu = lambda t: t.detach().cpu()  # noqa: E731
    return OracleResult(
        kept=[cpu(sel["kept"]).long()],
        scores=[cpu(sel["fused_raw"]).float()],
        logits=logits,
        extra={
            "av": cpu(av).float(),
            "sv": cpu(sv).float(),
            "av_ranked": cpu(sel["av_ranked"]).float(),
            "fused": cpu(sel["fused"]).float(),
            "candidates": cpu(sel["candidates"]),
            "set_a": cpu(sel["set_a"]),
            "set_b": cpu(sel["set_b"]),
            "merged": dict(zip(sel["sources"].tolist(), sel["destinations"].tolist())),
            "merged_values": [{a: cpu(v) for a, v in sel["merged_values"].items()}],
            "position_ids": cpu(pos),
        },
    )
