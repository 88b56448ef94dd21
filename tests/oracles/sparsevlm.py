"""Independent reference ("oracle") for SparseVLM (Zhang et al., ICML 2025, arXiv 2410.04417), the
score.py / utils.py code line with token recycling, and its debiased variant (arXiv 2508.17807,
intcomp/attention-bias patches/SparseVLMs.patch).

Written from the official code at Gumpest/SparseVLMs @ 734d900 (branch v1.5; the commit pinned by
intcomp/attention-bias; its modelling_sparse_llama.py is blob 69d6cd9, the one the debias patch applies to):
  llava/model/language_model/modelling_sparse_llama.py  LlamaDynamicvitModel.forward (raters, cut, recycling),
                                                        LlamaDynamicvitFlashAttention2.forward (return_logits)
  llava/model/language_model/score.py                   attn_postprocess_topk, sparse_token_list_{192,128,64}
  llava/model/language_model/utils.py                   cluster_and_merge (density-peak clustering + mean merge)
  llava/model/llava_arch.py                             prepare_sparse_inputs_labels_for_multimodal (pre_prompt_length)
and the debias patch (score.py::attn_postprocess_topk, `if layer_idx == 2 and weights is not None`).
Notes: /work/notes/sparsevlm.md.

Layer convention (the contract's): `layers` are the decoder layers BEFORE which tokens are cut.  The official
code runs sparse layer l (2, 6, 15) on the full sequence, scores with l's OWN attention probabilities and
removes tokens from l's output, i.e. the cut is before l+1: the official schedule is layers=(3, 7, 16),
scored with the attention of layers 2, 6, 15 (OFFICIAL_LAYERS below).

The decoder layers are run by hand and tokens are physically removed / inserted, as in
tests/test_engine.py::oracle_logits.  Batch size 1, no padding in the batch, one image (contiguous block).

Deliberate choices where the official code has no equivalent or is nondeterministic:
- GQA: the official score code multiplies q by k without repeat_kv (MHA only); here k is repeated per group.
- Ties: torch.topk (CUDA) has no specified tie order; here ties go to the lower index (stable descending
  sort), in the keep top-k, the recycling top-30% and the cluster-centre top-k.
- cluster_and_merge adds `torch.rand(...) * 1e-6` to the densities (random tie noise); omitted here.
- Precision: the official code runs in fp16 (scores included); here everything is float32 / model dtype.
- positions="original" (not official): kept tokens keep their prompt position ids and a recycled (merged)
  token takes the position id of its cluster centre.
"""

from __future__ import annotations

import math

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .common import OracleResult


# score.py: layer_dict = {2:0,6:1,15:2} (scoring layers) -> cut before 3, 7, 16 in this file's convention
OFFICIAL_LAYERS = (3, 7, 16)
# score.py: sparse_token_list_192 / _128 / _64, selected by --retained_tokens (the debias scripts use 128)
OFFICIAL_KEEPS = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
RECYCLE_FRACTION = 0.3  # modelling_sparse_llama.py: int(n_pruned * 0.3) + 1  "# Top 30%"


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def _topk_stable(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values, in descending order; ties -> lower index first."""
    order = torch.sort(values, descending=True, stable=True).indices
    return order[:k]


def _select_raters(embeds: torch.Tensor, v_start: int, n_vis: int, prompt_len: int) -> torch.Tensor:
    """modelling_sparse_llama.py::LlamaDynamicvitModel.forward, before the layer loop (prefill only):
        v_t = hidden_states[:, v_token_start: text_token_start]   # layer-0 input: projected image features
        t_t = hidden_states[:, text_token_start:]                  # EVERY prompt token after the image
        m_v_t = (v_t @ t_t^T).softmax(2).mean(1)                   # softmax over text tokens, mean over visual
        t_token_idx = torch.where(m_v_t > m_v_t.mean())            # strictly above the mean (= 1/T)
    Raw dot products (no normalisation, no 1/sqrt(d)).  Returns indices relative to the text start."""
    v_t = embeds[0, v_start : v_start + n_vis].float()
    t_t = embeds[0, v_start + n_vis : prompt_len].float()
    m_v_t = (v_t @ t_t.T).softmax(dim=1).mean(dim=0)  # (T,)
    return torch.where(m_v_t > m_v_t.mean())[0]


def _attention_probs(layer, rotary_emb, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Head-averaged causal attention probabilities of `layer` on input `hidden`, (n, n) float32.

    LlamaDynamicvitFlashAttention2.forward(return_logits=True): q/k from the layer's input_layernorm'd input,
    RoPE with the current position ids, attn = softmax(q @ k^T / sqrt(head_dim) + causal bias, dim=-1), i.e.
    softmax over ALL keys of the current sequence; score.py::attn_postprocess_topk then `.mean(1)` over heads.
    """
    attn = layer.self_attn
    head_dim = attn.head_dim
    x = layer.input_layernorm(hidden)
    n = x.shape[1]
    q = attn.q_proj(x).view(1, n, -1, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, n, -1, head_dim).transpose(1, 2)
    cos, sin = rotary_emb(hidden, positions[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # repeat_kv
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(head_dim)
    causal = torch.ones(n, n, dtype=torch.bool, device=hidden.device).tril()
    logits = logits.masked_fill(~causal, float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)[0]  # (n, n)


def _density_peak_clusters(x: torch.Tensor, cluster_num: int):
    """utils.py::cluster_and_merge, for one sample.  x: (m, C) hidden states of the recycling candidates,
    in the candidates' order (raw score descending).  Returns (centres, assign, merged):
      centres (cluster_num,) candidate indices, cluster j's centre = centres[j] (topk order of the centre score)
      assign  (m,) cluster of every candidate
      merged  (cluster_num, C) merged tokens, in cluster order
    """
    c = x.shape[1]
    # distance = ||x_i - x_j||_2 / sqrt(C)
    dist = (x[:, None, :] - x[None, :, :]).norm(dim=-1, p=2) / (c**0.5)
    # local density from the k = cluster_num nearest neighbours (self included, distance 0)
    dist_nearest = torch.topk(dist, k=cluster_num, dim=-1, largest=False).values
    density = (-(dist_nearest**2).mean(dim=-1)).exp()
    # (official: density += torch.rand(...) * 1e-6 -- random tie noise, omitted)
    # distance to the nearest token of strictly higher density; the global max distance if there is none
    higher = density[None, :] > density[:, None]  # higher[i, j]: j is denser than i
    dist_max = dist.max()
    delta = torch.where(higher, dist, dist_max).min(dim=-1).values
    # centres: top cluster_num of delta * density
    score = delta * density
    centres = _topk_stable(score, cluster_num)
    # every token joins its nearest centre (first centre on ties, torch argmin), centres join themselves
    assign = dist[centres].argmin(dim=0)
    assign[centres] = torch.arange(cluster_num, device=x.device)
    return centres, assign, _merge(x, assign, cluster_num)


def _merge(x: torch.Tensor, assign: torch.Tensor, cluster_num: int) -> torch.Tensor:
    """utils.py::cluster_and_merge, merge part: token_weight = 1, all_weight = count + 1e-6,
    x_merged[j] = sum over members of x * (1 / all_weight[j])  (a plain mean, up to the 1e-6)."""
    ones = torch.ones(len(assign), dtype=x.dtype, device=x.device)
    counts = torch.zeros(cluster_num, dtype=x.dtype, device=x.device).index_add_(0, assign, ones)
    norm_weight = 1.0 / (counts + 1e-6)
    merged = torch.zeros(cluster_num, x.shape[1], dtype=x.dtype, device=x.device)
    return merged.index_add_(0, assign, x * norm_weight[assign][:, None])


def _label_members(label, recycled_members: dict) -> list[int]:
    """Original visual indices a slot stands for (recursively through earlier recycled tokens)."""
    if isinstance(label, int):
        return [label]
    return sorted(i for member in recycled_members[label] for i in _label_members(member, recycled_members))


# ----------------------------------------------------------------------------------------------------------
# the forward pass
# ----------------------------------------------------------------------------------------------------------
def _run(model, embeds, prompt_len, v_start, n_vis, raters, cuts, keep_list, *, recycle, weights, padding,
         positions, decode_positions, clamp, plan):
    """Run the decoder by hand.  plan=None: make every decision from the (prompt-only) sequence and record it.
    plan=list: re-apply the recorded decisions (selection, recycling candidates, clusters) to a longer sequence."""
    lm = model.model.language_model
    eager = model.config._attn_implementation == "eager"
    device = embeds.device
    n_layers = len(lm.layers)
    n_new = embeds.shape[1] - prompt_len

    hidden = embeds
    # original prompt position of every token of the current sequence (merged tokens: their centre's)
    orig_pos = torch.arange(embeds.shape[1], device=device)
    slots: list = list(range(n_vis))  # labels of the visual segment: int = original index, str = recycled token
    recycled_members: dict = {}  # recycled label -> member labels
    stages_info: list[dict] = []
    record: list[dict] = []
    pending = None  # attention probs of the previous layer, when the next layer is a cut
    slot_counts: list[int] = []  # visual slots in each layer's input

    def current_positions():
        n_prompt_now = hidden.shape[1] - n_new
        new_pos = torch.arange(n_new, device=device)
        # appended (generated) tokens: HF generate continues the ORIGINAL numbering (contract);
        # the official decode uses the layer's KV-cache length (LlamaDynamicvitFlashAttention2.forward:
        # position_ids = past_key_value.get_usable_length(...) when q_len == 1)
        new_pos = new_pos + (prompt_len if decode_positions == "prompt_length" else n_prompt_now)
        if positions == "compact":
            # modelling_sparse_llama.py: position_ids = position_ids[:, :len(select_token_idx[0]) + cluster_num]
            prompt_pos = torch.arange(n_prompt_now, device=device)
        else:
            prompt_pos = orig_pos[:n_prompt_now]
        return torch.cat([prompt_pos, new_pos])

    for index, layer in enumerate(lm.layers):
        if index in cuts:
            s = cuts[index]
            n_slots = len(slots)
            text_start = v_start + n_slots
            if plan is None:
                # ---- score.py::attn_postprocess_topk: raters' head-mean attention to the visual segment ----
                rows = text_start + raters  # raters keep their offset from the text start (all text is kept)
                relation = pending[rows][:, v_start:text_start].mean(dim=0)  # (n_slots,) raw score
                ranked = relation.clone()
                if s == 0:
                    # debias patch: `if layer_idx == 2 and weights is not None: relation_vis = relation_vis * weights`
                    # (weights = fitted weights * SparseVLM's 24x24 padding mask); first stage only; the keep
                    # count is NOT lowered and recycling keeps using the raw relation_vis_text.
                    if weights is not None:
                        ranked = ranked * weights.to(ranked)
                    if padding is not None:
                        ranked = ranked * (~padding.to(device=ranked.device, dtype=torch.bool)).to(ranked)
                # torch.topk(relation_vis, min(sparse_token_list[stage], v_token_num - 1))
                k = min(keep_list[s], n_slots - 1) if clamp else min(keep_list[s], n_slots)
                keep_idx = torch.sort(_topk_stable(ranked, k)).values
                keep_mask = torch.zeros(n_slots, dtype=torch.bool, device=device)
                keep_mask[keep_idx] = True
                pruned_idx = torch.where(~keep_mask)[0]  # ascending (torch.where(pred_score_vis == 0))
                decision = {"keep_mask": keep_mask, "relation": relation, "ranked": ranked, "k": k}
                if recycle and len(pruned_idx) > 0:
                    # merge_token_num_stage1 = int(n_pruned * 0.3) + 1; top by RAW relation_vis_text
                    n_cand = int(len(pruned_idx) * RECYCLE_FRACTION) + 1
                    cand = pruned_idx[_topk_stable(relation[pruned_idx], n_cand)]
                    cluster_num = int(n_cand / 10) + 1
                    # clustered: hidden states output by the scoring layer (= this layer's input), layer_outputs[0]
                    centres, assign, _ = _density_peak_clusters(hidden[0, v_start + cand], cluster_num)
                    decision.update(cand=cand, cluster_num=cluster_num, centres=centres, assign=assign)
                record.append(decision)
            else:
                decision = plan[s]
            keep_mask = decision["keep_mask"]
            kept_slot_idx = torch.where(keep_mask)[0]

            # ---- the cut: prefix + kept visual (sequence order) + merged tokens + text (+ appended) ----
            pieces_h = [hidden[:, :v_start], hidden[:, v_start + kept_slot_idx]]
            pieces_p = [orig_pos[:v_start], orig_pos[v_start + kept_slot_idx]]
            new_slots = [slots[i] for i in kept_slot_idx.tolist()]
            clusters = []
            if "cand" in decision:
                cand, cluster_num = decision["cand"], decision["cluster_num"]
                centres, assign = decision["centres"], decision["assign"]
                # cluster means of the candidates' hidden states at the cut (recomputed on a replay)
                merged = _merge(hidden[0, v_start + cand], assign, cluster_num)
                pieces_h.append(merged[None])
                centre_pos = orig_pos[v_start + cand[centres]]
                pieces_p.append(centre_pos)
                for j in range(cluster_num):
                    label = f"r{s}.{j}"
                    members = [slots[i] for i in cand[assign == j].tolist()]
                    recycled_members[label] = members
                    clusters.append(
                        {
                            "label": label,
                            "centre": slots[int(cand[centres[j]])],
                            "members": members,
                            "visual_members": _label_members(label, recycled_members),
                            "insert_at": v_start + len(kept_slot_idx) + j,  # sequence index after the stage
                            "original_position": int(centre_pos[j]),
                        }
                    )
                    new_slots.append(label)
            pieces_h.append(hidden[:, text_start:])
            pieces_p.append(orig_pos[text_start:])
            if plan is None:
                candidates = decision["cand"].tolist() if "cand" in decision else []
                stages_info.append(
                    {
                        "layer": index,
                        "score_layer": index - 1,
                        "slots_before": list(slots),
                        "slot_scores": decision["relation"],  # raw, every slot (recycled ones included)
                        "ranked_scores": decision["ranked"],  # what the top-k ranked (debiased at stage 0)
                        "k": decision["k"],
                        "kept_slots": new_slots[: len(kept_slot_idx)],
                        "pruned_slots": [slots[i] for i in torch.where(~keep_mask)[0].tolist()],
                        "recycle_candidates": [slots[i] for i in candidates],  # raw score descending
                        "n_clusters": len(clusters),
                        "clusters": clusters,
                        "slots_after": list(new_slots),
                    }
                )
            hidden = torch.cat(pieces_h, dim=1)
            orig_pos = torch.cat(pieces_p)
            slots = new_slots

        pos = current_positions()
        if index + 1 in cuts and plan is None:
            # the cut before index+1 is scored with THIS layer's attention (the official sparse layer)
            n_prompt_now = hidden.shape[1] - n_new  # (n_new == 0 when deciding)
            pending = _attention_probs(layer, lm.rotary_emb, hidden[:, :n_prompt_now], pos[:n_prompt_now])
        slot_counts.append(len(slots))
        cos, sin = lm.rotary_emb(hidden, pos[None])
        n = hidden.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        mask = torch.where(causal, 0.0, torch.finfo(hidden.dtype).min)[None, None].to(hidden.dtype) if eager else None
        hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos[None])

    logits = model.lm_head(lm.norm(hidden)).float()
    return logits, record, stages_info, slots, recycled_members, slot_counts, n_layers


def oracle_sparsevlm(
    model,
    inputs,
    *,
    layers,
    keeps,
    recycle: bool = True,
    weights: torch.Tensor | None = None,
    padding: torch.Tensor | None = None,
    positions: str = "compact",
    new_tokens: torch.Tensor | None = None,
    clamp: bool = True,
    decode_positions: str = "prompt_length",
) -> OracleResult:
    """SparseVLM (v1 code line with recycling) on a HF LlavaForConditionalGeneration, by hand.

    layers: decoder layers BEFORE which tokens are cut (official: OFFICIAL_LAYERS = (3, 7, 16), i.e. scored with
        the attention of layers 2, 6, 15 and cut from their output).  Every layer must be >= 1.
    keeps: per stage, the top-k size (score.py::sparse_token_list_*, e.g. OFFICIAL_KEEPS[128] = (303, 110, 36)).
        IMPORTANT: as in the official code, k is taken over the CURRENT visual segment, which after stage 0
        contains the recycled (merged) tokens of earlier stages; they are scored like any visual token and can
        be kept, pruned, or recycled again.  Hence `kept[s]` (ORIGINAL visual tokens present after stage s) has
        len(kept[s]) <= keeps[s] (== at stage 0), and the visual segment after stage s holds
        min(keeps[s], n-1) kept slots + the n_clusters recycled tokens of that stage.
        The official code keeps min(keeps[s], n_slots - 1) (at least one token is always pruned); clamp=False
        keeps min(keeps[s], n_slots) instead, so that keeping everything is a no-op (no recycling either).
    recycle: token recycling (top 30% of the pruned slots by RAW score -> density-peak clusters -> mean merge).
    weights, padding: (V,) debias weights / bool padding mask; multiplied into the score at the FIRST stage
        only (debias patch: layer_idx == 2); the keep count is not lowered; recycling uses the raw score.
    positions: "compact" (official: renumbered 0..n-1 after each cut) or "original" (kept tokens keep their
        prompt position ids; a recycled token takes its cluster centre's).
    new_tokens: (1, T) appended tokens; decisions are made on the prompt alone, then replayed.
    decode_positions: "prompt_length" (contract / HF generate: appended token t has position prompt_len + t in
        every layer) or "cache_length" (official decode: position = prompt tokens present in that layer + t).

    Returns OracleResult(kept, scores, logits, extra); extra has "raters" (indices relative to the text start),
    "raters_abs" (prompt positions), "v_start", "stages" (per stage: layer, score_layer, slots_before,
    slot_scores, ranked_scores, k, kept_slots, pruned_slots, recycle_candidates, n_clusters, clusters (label,
    centre, members, visual_members, insert_at, original_position), slots_after), "final_slots",
    "visual_per_layer" (visual slots in each layer's input) and "equivalent_budget" (the official
    accounting: mean over layers of the visual count after each layer, the cut before l+1 counted at l).
    Slot labels: int = original visual index, "r{s}.{j}" = recycled token j of stage s.
    """
    layers = [int(l) for l in layers]
    keep_list = [int(k) for k in keeps]
    if len(layers) != len(keep_list):
        raise ValueError("layers and keeps must have the same length")
    if any(l < 1 for l in layers) or sorted(set(layers)) != layers:
        raise ValueError("layers must be strictly increasing and >= 1 (scores come from layer l-1)")
    if positions not in ("compact", "original"):
        raise ValueError(positions)
    if decode_positions not in ("prompt_length", "cache_length"):
        raise ValueError(decode_positions)

    base = model.model
    prompt_ids = inputs["input_ids"]
    assert prompt_ids.shape[0] == 1, "batch size 1"
    prompt_len = prompt_ids.shape[1]
    is_image = prompt_ids[0] == model.config.image_token_id
    n_vis = int(is_image.sum())
    v_start = int(torch.where(is_image)[0][0])
    # llava_arch.py: pre_prompt_length = index of the image placeholder; the image is one contiguous block
    assert bool(is_image[v_start : v_start + n_vis].all()), "one contiguous image block"
    if weights is not None:
        weights = weights.reshape(n_vis)
    if padding is not None:
        padding = padding.reshape(n_vis)

    def embed(ids):
        embeds = base.get_input_embeddings()(ids)
        image_features = torch.cat(list(base.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output))
        where = torch.zeros(ids.shape[1], dtype=torch.bool, device=ids.device)
        where[:prompt_len] = is_image  # appended tokens are never image tokens
        embeds[0, where] = image_features.to(embeds.dtype)
        return embeds

    cuts = {l: s for s, l in enumerate(layers)}
    with torch.no_grad():
        embeds = embed(prompt_ids)
        raters = _select_raters(embeds, v_start, n_vis, prompt_len)
        common = dict(recycle=recycle, weights=weights, padding=padding, positions=positions,
                      decode_positions=decode_positions, clamp=clamp)
        logits, record, stages_info, slots, members, slot_counts, n_layers = _run(
            model, embeds, prompt_len, v_start, n_vis, raters, cuts, keep_list, plan=None, **common
        )
        if new_tokens is not None and new_tokens.shape[1] > 0:
            full = embed(torch.cat([prompt_ids, new_tokens.to(prompt_ids.device)], dim=1))
            logits = _run(model, full, prompt_len, v_start, n_vis, raters, cuts, keep_list, plan=record, **common)[0]

    kept, scores = [], []
    for info in stages_info:
        raw = torch.full((n_vis,), float("nan"), dtype=torch.float32)
        for label, value in zip(info["slots_before"], info["slot_scores"].tolist()):
            if isinstance(label, int):
                raw[label] = value
        scores.append(raw)
        kept.append(torch.tensor(sorted(l for l in info["slots_after"] if isinstance(l, int)), dtype=torch.long))
    # official accounting (modelling_sparse_llama.py: num_token.append(v_token_num) after every layer, the
    # sparse layer counted after its cut; equal token num = sum(num_token) / num_layers)
    after_layer = slot_counts[1:] + [len(slots)]
    extra = {
        "raters": raters.cpu(),
        "raters_abs": (raters + v_start + n_vis).cpu(),
        "v_start": v_start,
        "stages": stages_info,
        "final_slots": slots,
        "visual_per_layer": slot_counts,
        "equivalent_budget": sum(after_layer) / n_layers,
    }
    return OracleResult(kept=kept, scores=scores, logits=logits, extra=extra)
