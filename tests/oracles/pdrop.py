"""Independent reference ("oracle") for PyramidDrop (Xing et al., CVPR 2025, arXiv 2410.17247) and its
debiased variant (arXiv 2508.17807, intcomp/attention-bias patches/PyramidDrop.patch).

Written from the official code (Cooperx521/PyramidDrop @ 6444f30, the commit pinned by intcomp/attention-bias):
  llava/model/modeling_llama_pdrop.py   LlamaModel.pdrop_forward, LlamaModel.pdrop_rank_drop
  llava/model/llava_arch.py             prepare_inputs_labels_for_multimodal_pdrop (image_token_posi, prompt_len)
  llava/eval/model_vqa_loader.py        layer_list / image_token_ratio_list (a 1.0 is prepended)
and from the debias patch (applied inside pdrop_rank_drop, stage 0 only).  Notes: /work/notes/pdrop.md.

The decoder layers are run by hand and the visual tokens that are not kept are physically removed, as in
tests/test_engine.py::oracle_logits.  Batch size 1, no padding in the batch.

Deliberate generalisations / choices (the official code has no equivalent):
- GQA: the official score code multiplies q (num_heads) by k (num_key_value_heads) without repeat_kv, i.e. it
  assumes MHA (LLaMA/Vicuna-7B).  Here k is repeated per group, as the layer's own attention does.
- Several images in one prompt: the official code handles one image per sample (first placeholder, contiguous
  block).  Here all image tokens of the prompt form one visual set ranked together (the contract's V).
- Ties: torch.topk on CUDA has no specified tie order; here ties are broken toward the lower visual index
  (stable descending sort).  Ties occur in practice only among padding-zeroed scores.
- Precision: official scores are softmax(fp32) cast back to fp16, head-mean in fp16, debias weights cast to fp16.
  Here the score maths is float32 throughout.
"""

from __future__ import annotations


import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .common import OracleResult


def _pdrop_scores(layer, hidden, positions, rotary_emb, visual_now):
    """Score of every visual token currently in the sequence, as pdrop_rank_drop computes it.

    modeling_llama_pdrop.py::pdrop_rank_drop:
      hidden_states = self.layers[rank_layer].input_layernorm(features)     # the layer ABOUT TO RUN
      q = self_attn.q_proj(hidden_states); k = self_attn.k_proj(hidden_states)
      q, k = apply_rotary_pos_emb(q, k, cos, sin, position_ids)             # current (renumbered) position ids
      query row = prompt_len + image_tokens - 1                             # last token of the (prompt) sequence
      attn = softmax(q_last @ k^T / sqrt(head_dim) + causal_mask_row, fp32) # over ALL keys 0..last
      attention_avg_head = mean over heads; then [:, image_index : image_index + image_tokens]; mean over the
      (single) query row.
    """
    attn = layer.self_attn
    head_dim = attn.head_dim
    normed = layer.input_layernorm(hidden)  # (1, n, d)
    n = normed.shape[1]
    q = attn.q_proj(normed).view(1, n, -1, head_dim).transpose(1, 2)  # (1, H, n, hd)
    k = attn.k_proj(normed).view(1, n, -1, head_dim).transpose(1, 2)  # (1, Hkv, n, hd)
    cos, sin = rotary_emb(normed, positions[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # GQA generalisation (official code assumes MHA)
    q_last = q[0, :, -1:, :].float()  # (H, 1, hd): the last instruction token = last prompt token
    logits = q_last @ k[0].float().transpose(1, 2) / head_dim**0.5  # (H, 1, n)
    # the causal-mask row of the last query masks nothing: every key 0..n-1 is visible
    probs = torch.softmax(logits, dim=-1)  # softmax over ALL tokens of the current sequence
    row = probs.mean(dim=0)[0]  # mean over heads -> (n,)
    return row[visual_now]  # then slice to the image tokens (in sequence order)


def _top_keep(score, keep):
    """torch.topk(score, keep).indices, then .sort(): the kept tokens stay in prompt order.
    Ties -> lower index first (deterministic stand-in for CUDA topk)."""
    order = torch.sort(score, descending=True, stable=True).indices
    return torch.sort(order[:keep]).values


def oracle_pdrop(
    model,
    inputs,
    *,
    layers,
    keeps,
    weights=None,
    padding=None,
    positions="compact",
    new_tokens=None,
    new_token_positions="uncut",
) -> OracleResult:
    """PyramidDrop by hand.

    layers: stage layers, 0-based; the cut happens before decoder layer `layers[s]` runs, and that layer's
        input_layernorm/q_proj/k_proj compute the score (official `layer_list` has the same numbers: rank_layer =
        layer_idx + 1 is checked after layer_idx ran, and self.layers[rank_layer] is used).
    keeps: visual tokens present after each stage (official: int(V * image_token_ratio_list[s]) from the ORIGINAL V).
    weights: (V,) debias weights, multiplied into the stage-0 score only (patch: `if self.tag == "after" and
        cur_num == 0`), indexed by the visual index of the image block.
    padding: (V,) bool, True = padding patch; stage-0 score zeroed there (patch: `if cur_num == 0:` score *=
        pad mask, threshold 0.01 in the patch).  The keep count is NOT lowered.
    positions: "compact" (official: position_ids[i, :cur_len] = arange(cur_len) after every cut) or "original".
    new_tokens: (1, T) tokens appended after the prompt; selection from the prompt only, then replayed.
    new_token_positions: "uncut" (the contract: appended token t has id N + t in every layer) or "shifted" (what
        the official decode does: pdrop_forward subtracts, at every rank layer, the number of visual tokens removed
        there, so in the segment after stage s appended token t has id N + t - (V - keeps[s])).
    """
    assert positions in ("compact", "original")
    assert new_token_positions in ("uncut", "shifted")
    layers, keeps = [int(x) for x in layers], [int(x) for x in keeps]
    assert len(layers) == len(keeps) and layers == sorted(set(layers)), "stage layers must be strictly increasing"
    base = model.model
    lm = base.language_model
    ids = inputs["input_ids"]
    assert ids.shape[0] == 1, "batch size 1"
    n_prompt = ids.shape[1]
    is_image = ids[0] == model.config.image_token_id
    V = int(is_image.sum())
    assert all(0 <= k <= V for k in keeps) and all(a >= b for a, b in zip(keeps, keeps[1:]))
    assert all(0 < l < len(lm.layers) for l in layers), "a stage needs a layer before and the layer it scores with"

    # Embeddings: LLaVA splices the projected image features into the placeholder positions
    # (llava_arch.py::prepare_inputs_labels_for_multimodal_pdrop; HF: LlavaModel.forward).
    image_features = torch.cat(list(base.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output))

    def embed(token_ids):
        e = base.get_input_embeddings()(token_ids)
        e[0, token_ids[0] == model.config.image_token_id] = image_features.to(e.dtype)
        return e

    visual_rank = torch.full((n_prompt,), -1, dtype=torch.long)
    visual_rank[is_image] = torch.arange(V)
    eager = model.config._attn_implementation == "eager"

    def run(token_ids, fixed_kept=None):
        """Runs the decoder by hand.  fixed_kept=None: select from this (prompt-only) sequence.
        Otherwise apply the given per-stage kept sets (replay with appended tokens)."""
        n_all = token_ids.shape[1]
        hidden = embed(token_ids)
        index = torch.arange(n_all)  # original sequence index of every row still present
        rank = torch.cat([visual_rank, torch.full((n_all - n_prompt,), -1, dtype=torch.long)])
        pos = torch.arange(n_all)  # position ids (pdrop_forward: arange when position_ids is None)
        kept_list, score_list = [], []
        for i, layer in enumerate(lm.layers):
            if i in layers:
                s = layers.index(i)
                is_vis = rank[index] >= 0
                vis_ids = rank[index][is_vis]  # visual indices present, in prompt order
                if fixed_kept is None:
                    # pdrop_forward: `if hidden_states.shape[1] != 1` -> rank & drop only in prefill
                    raw = _pdrop_scores(layer, hidden, pos, lm.rotary_emb, is_vis)
                    full = torch.full((V,), float("nan"))
                    full[vis_ids] = raw.float()
                    score_list.append(full)
                    score = raw.clone()
                    if s == 0 and padding is not None:  # patch: cur_num == 0, score * pad_mask (zeroing)
                        score = score * (~padding.to(torch.bool)[vis_ids]).float()
                    if s == 0 and weights is not None:  # patch: tag == "after" and cur_num == 0
                        score = score * weights.float()[vis_ids]
                    chosen = vis_ids[_top_keep(score, keeps[s])]
                    kept = torch.sort(chosen).values
                else:
                    kept = fixed_kept[s]
                kept_list.append(kept)
                # new sequence = [text before image] + [kept image tokens, prompt order] + [rest] (pdrop_rank_drop)
                keep_row = (~is_vis) | torch.isin(rank[index], kept)
                hidden, index = hidden[:, keep_row], index[keep_row]
                in_prompt = index < n_prompt
                if positions == "compact":
                    # pdrop_rank_drop: position_ids[i, :cur_len] = torch.arange(0, cur_len)
                    new_pos = torch.empty_like(index)
                    new_pos[in_prompt] = torch.arange(int(in_prompt.sum()))
                else:
                    new_pos = index.clone()
                if new_token_positions == "uncut":
                    new_pos[~in_prompt] = index[~in_prompt]  # N + t, as HF generate numbers them
                else:
                    # pdrop_forward decode branch: cur_position_ids - (cur_visual_length - next_visual_length)
                    removed = V - len(kept)
                    new_pos[~in_prompt] = index[~in_prompt] - removed
                pos = new_pos
            cos, sin = lm.rotary_emb(hidden, pos[None])
            n = hidden.shape[1]
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            mask = None
            if eager:  # explicit 4-D additive causal mask, as tests/test_engine.py::oracle_logits
                mask = torch.where(causal, 0.0, torch.finfo(hidden.dtype).min)[None, None].to(hidden.dtype)
            hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos[None])
        logits = model.lm_head(lm.norm(hidden)).float()
        return kept_list, score_list, logits, pos

    with torch.no_grad():
        kept, scores, logits, final_pos = run(ids)
        if new_tokens is not None and new_tokens.shape[1] > 0:
            _, _, logits, final_pos = run(torch.cat([ids, new_tokens.to(ids.device)], dim=1), fixed_kept=kept)
    return OracleResult(
        kept=kept,
        scores=scores,
        logits=logits,
        extra={"num_visual": V, "layers": layers, "keeps": keeps, "final_position_ids": final_pos},
    )
