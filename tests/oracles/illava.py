"""Independent reference ("oracle") for iLLaVA, written from the official code, not from vtprune.

Sources: github.com/hulianyuyy/iLLaVA @ 4068149 (arXiv 2412.06263). The official code exists for LLaVA-OneVision
(SigLIP + Qwen2) and Qwen2-VL only; there is no LLaVA-1.5 code and no debiasing patch. Followed here:
- ViT stage: src/LLaVA-OneVision/llava/model/multimodal_encoder/siglip_encoder.py, ``SigLipEncoderLayer.forward``
  (``perform_self_selection``) and ``SigLipEncoder.forward`` (``i in Layer_index``, 0-based layer indices).
- LLM stage: src/transformers-4.46.0/src/transformers/models/qwen2/modeling_qwen2.py,
  ``Qwen2Model.forward_illava`` (``elif layer_idx in illava_llm_k``).
- Settings: README / src/lmms_eval-0.2.4/lmms_eval/models/llava_onevision_training_free.py (images: ViT layers
  5-6-7-8, r=92 per layer; LLM layer 8, ``illava_llm_r=0.70`` = keep 70%). Notes: /work/notes/illava.md.

The merge rule ("r+1 lowest merged into the best of them"), used by both stages:
    rank the tokens by score, descending; T = the r+1 lowest, ordered best first: t_0 (destination), ..., t_r
    (the lowest); h[t_0] <- sum_k (k+1) h[t_k] / sum_k (k+1)   (weights 1 for the destination ... r+1 for the
    lowest: official ``size = arange(1, r+2)`` on ``indices[L-(r+1):]``, resp. ``arange(r+1, 0, -1)`` on the
    ascending ``topk(r+1, largest=False)``); t_1..t_r are removed; the others keep their order. No token sizes are
    carried across merges.

ViT stage, inside each vision-encoder layer l in ``vit_layers`` (0-based): after self-attention and its residual,
BEFORE layer_norm2/MLP: score_j = mean over all query rows i of (mean over heads of the layer's own attention
probabilities)[i, j] ("attention received"); merge ``vit_merge`` tokens as above; the MLP runs on the shortened
sequence. LLaVA-1.5 adaptation (CLIP has a [CLS] token at 0, SigLIP has none): [CLS] stays a query row but is
never ranked, merged or removed; only patches are. The language model then receives only the remaining patches
(HF LLaVA: the image simply has fewer tokens), positions renumbered 0..n'-1 ("compact", as in the official code,
where the LLM input is built with ``729 - len(vit_k) * r`` tokens).

LLM stage, before decoder layer K in ``layer`` (the tokens are cut before K): score = the attention probabilities
of decoder layer K-1 (softmax over all keys, causal), mean over heads, row of the LAST prompt token, visual
columns; merge ``present - keep`` tokens as above into the hidden states entering K; cut. Positions: the official
code sets ``position_ids = keep_indexs`` (kept tokens keep their LLM-input positions): ``positions="original"``
default. The cache of layers < K is NOT trimmed (decode tokens see the whole prompt there).

Debiasing (no published code): ``weights`` and ``padding`` multiply the LLM-stage score, indexed by ORIGINAL
visual index, at the first LLM stage (``debias_stages="first"``, as the FastV/HiMAP/TokenCarve patches do) or at
every LLM stage ("all"); the merge counts are not changed; the ViT stage is never debiased.

Deliberate choices: ties -> a stable descending sort (the lower index ranks higher) in both stages; float32 (the
official code casts merged values to fp16 ``.half()``).

Example with a tiny model whose vision tower has enough layers for a ViT stage (LLaVA uses the output of layer
N-2 of an N-layer tower when ``vision_feature_layer=-2``, so merging layers must be <= N-2)::

    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    processor = conftest.build_processor()
    tok = processor.tokenizer
    vision = CLIPVisionConfig(image_size=84, patch_size=14, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=6, num_attention_heads=4, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()   # then sharpen q/k as conftest.build_model does
    model.set_attn_implementation("sdpa")
    result = oracle_illava(model, inputs, layer=3, keep=12, vit_layers=[1, 2, 3], vit_merge=4)
    # 36 patches -> 32 -> 28 -> 24 reach the language model; 12 remain after the cut before decoder layer 3
"""

from __future__ import annotations


import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .common import OracleResult


def _as_list(value, n, name):
    if isinstance(value, int):
        return [value] * n
    value = [int(v) for v in value]
    if len(value) != n:
        raise ValueError(f"{name} needs {n} entries")
    return value


def _merge(scores: torch.Tensor, r: int):
    """The iLLaVA merge plan on one score vector (over the tokens present, local indices).

    Returns (tail, weights): ``tail`` = the r+1 lowest-scoring local indices, best first (tail[0] is the
    destination, tail[1:] are removed); ``weights`` = 1, 2, ..., r+1 (official ``size``)."""
    order = torch.sort(scores, descending=True, stable=True).indices  # topk(L).indices, ties -> lower index first
    tail = order[order.numel() - (r + 1) :]
    weights = torch.arange(1, r + 2, dtype=torch.float32, device=scores.device)
    return tail, weights


def _weighted(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(size @ values) / size.sum()"""
    return (weights.to(values.dtype) @ values) / weights.sum().to(values.dtype)


def _vision_stage(model, pixel_values, vit_layers, vit_merge):
    """Vision tower run by hand (HF CLIPVisionModel: embeddings, pre_layrnorm, encoder layers), with the iLLaVA
    merge inside the chosen layers; returns the projected features of the remaining patches and the stage log."""
    base = model.model
    tower = base.vision_tower
    n_layers = len(tower.encoder.layers)
    f = model.config.vision_feature_layer
    if not isinstance(f, int):
        raise ValueError("the oracle handles one vision_feature_layer")
    used = f if f >= 0 else n_layers + 1 + f  # hidden_states[f] = output of layer used-1
    if model.config.vision_feature_select_strategy != "default":
        raise ValueError("the oracle handles the 'default' strategy ([CLS] dropped)")
    if any(not 0 <= l < used for l in vit_layers):
        raise ValueError(f"vit_layers must be in 0..{used - 1} (layers whose output reaches the projector)")
    h = tower.embeddings(pixel_values.to(tower.embeddings.patch_embedding.weight.dtype))
    h = tower.pre_layrnorm(h)
    n_patches = h.shape[1] - 1
    present = torch.arange(n_patches, device=h.device)  # original visual index of each patch token still present
    log = []
    for l in range(used):
        layer = tower.encoder.layers[l]
        residual = h
        x = layer.layer_norm1(h)
        attn = layer.self_attn
        h = residual + attn(hidden_states=x, attention_mask=None)[0]
        if l in vit_layers:
            r = vit_merge[vit_layers.index(l)]
            if not 0 <= r < present.numel():
                raise ValueError(f"cannot merge {r} of {present.numel()} patches at vision layer {l}")
            # the layer's own attention probabilities (SigLipAttention.forward): softmax(q k^T * scale), no mask
            n = x.shape[1]
            q = attn.q_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2).float()
            k = attn.k_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2).float()
            probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)
            received = probs.mean(dim=1)[0].mean(dim=0)  # attn_weights.mean(1) (heads), .mean(0) (query rows)
            patch_score = received[1:]  # [CLS] (row/column 0) is a query but never ranked
            score = torch.full((n_patches,), float("nan"), device=h.device)
            score[present] = patch_score
            tail, weights = _merge(patch_score, r)
            rows = tail + 1  # sequence rows (after [CLS])
            value = _weighted(h[0, rows].float(), weights).to(h.dtype)
            h = h.clone()
            h[0, rows[0]] = value
            keep = torch.ones(h.shape[1], dtype=torch.bool, device=h.device)
            keep[rows[1:]] = False
            destination = int(present[tail[0]])
            sources = present[tail].tolist()
            h, present = h[:, keep], present[keep[1:]]
            log.append(dict(
                kind="vit", layer=l, kept=present.clone(), score=score,
                merge=dict(destination=destination, members=sources, weights=weights.tolist()),
                merged_values={destination: value.detach().clone()},
            ))
        residual = h
        h = residual + layer.mlp(layer.layer_norm2(h))
    feats = base.multi_modal_projector(h[:, 1:])[0]  # "default": [CLS] dropped; projector per token
    return feats, present, log


def _attention_probs(layer, hidden, rotary_emb, positions):
    """Causal softmax attention probabilities (1, heads, n, n) float32 of decoder ``layer`` on its input."""
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
    causal = torch.ones(n, n, dtype=torch.bool, device=hidden.device).tril()
    return logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)


def _run(model, ids, pixel_values, prompt_len, cfg, fixed=None):
    """One pass over ``ids``; the LLM-stage plans are made here from the prompt alone unless ``fixed`` is given
    (the vision stage depends on the image only and is recomputed identically)."""
    base = model.model
    lm = base.language_model
    device = ids.device
    is_image = ids[0] == model.config.image_token_id
    V = int(is_image.sum())
    if V == 0:
        raise ValueError("no image tokens in the prompt")
    if cfg["vit_layers"]:
        feats, present, log = _vision_stage(model, pixel_values, cfg["vit_layers"], cfg["vit_merge"])
    else:
        feats = torch.cat(list(base.get_image_features(pixel_values=pixel_values).pooler_output))
        present, log = torch.arange(V, device=device), []
    if feats.shape[0] != present.numel() or (not cfg["vit_layers"] and present.numel() != V):
        raise ValueError("image features do not match the image tokens")
    visual_rank = torch.full_like(ids[0], -1)
    visual_rank[is_image] = torch.arange(V, device=device)
    # the language model's input: text tokens + the remaining patches (placeholders of removed patches dropped)
    lm_keep = (visual_rank < 0) | torch.isin(visual_rank, present)
    embeds = base.get_input_embeddings()(ids)
    embeds[0, is_image] = 0  # placeholders; the remaining ones are filled below
    hidden = embeds[:, lm_keep].clone()
    idx = torch.nonzero(lm_keep).flatten()  # original prompt index of each LM token
    rank = visual_rank[idx]
    hidden[0, rank >= 0] = feats.to(hidden.dtype)  # patches in prompt (= original visual) order
    lm_prompt_len = int((idx < prompt_len).sum())
    if cfg["vit_positions"] == "compact":  # HF / official: the LM input is a plain shorter sequence
        pos = torch.arange(idx.numel(), device=device)
        if cfg["decode_positions"] == "prompt":  # appended tokens: original numbering (contract, HF generate)
            pos = torch.where(idx < prompt_len, pos, idx)
        else:  # "lm_input" (official iLLaVA): appended tokens continue the LM input's numbering
            pos = torch.where(idx < prompt_len, pos, idx - prompt_len + lm_prompt_len)
    else:
        pos = idx.clone()

    stages = {layer: s for s, layer in enumerate(cfg["layers"])}
    plans = [] if fixed is None else fixed
    probs = None
    for li, dec in enumerate(lm.layers):
        if li in stages:
            s = stages[li]
            rank = visual_rank[idx]
            vis_rows = torch.nonzero(rank >= 0).flatten()
            ranks_here = rank[vis_rows]
            if fixed is None:
                # last_layer_attention_avg = mean over heads; [-1] = last prompt token; image columns
                last = int(torch.nonzero(idx == prompt_len - 1).flatten()[0])
                row = probs.mean(dim=1)[0, last, vis_rows].float()
                score = torch.full((V,), float("nan"), device=device)
                score[ranks_here] = row
                ranking = row.clone()
                if s == 0 or cfg["debias_stages"] == "all":
                    if cfg["padding"] is not None:
                        ranking = ranking * (~cfg["padding"].to(device).bool()[ranks_here]).float()
                    if cfg["weights"] is not None:
                        ranking = ranking * cfg["weights"].to(device, torch.float32)[ranks_here]
                r = ranks_here.numel() - cfg["keeps"][s]
                if not 0 <= r < ranks_here.numel():
                    raise ValueError(f"keep {cfg['keeps'][s]} impossible with {ranks_here.numel()} visual tokens")
                tail, weights = _merge(ranking, r)
                ranked = torch.full((V,), float("nan"), device=device)
                ranked[ranks_here] = ranking
                plans.append(dict(tail=ranks_here[tail], weights=weights, score=score, ranking=ranked))
            plan = plans[s]
            members = plan["tail"]  # visual indices, destination first
            rows_of = {int(v): int(row) for v, row in zip(ranks_here, vis_rows)}
            rows = torch.tensor([rows_of[int(v)] for v in members], device=device)
            value = _weighted(hidden[0, rows].float(), plan["weights"]).to(hidden.dtype)
            hidden = hidden.clone()
            hidden[0, rows[0]] = value
            plan["value"] = value.detach().clone()
            keep = torch.ones(hidden.shape[1], dtype=torch.bool, device=device)
            keep[rows[1:]] = False
            hidden, idx, pos = hidden[:, keep], idx[keep], pos[keep]
            if cfg["positions"] == "compact":
                in_prompt = idx < prompt_len
                pos = torch.where(in_prompt, torch.cumsum(in_prompt.long(), 0) - 1, pos)
        if li + 1 in stages and fixed is None:
            probs = _attention_probs(dec, hidden, lm.rotary_emb, pos)
        cos, sin = lm.rotary_emb(hidden, pos[None])
        n = hidden.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        mask = torch.where(causal, 0.0, torch.finfo(hidden.dtype).min)[None, None].to(hidden.dtype)
        hidden = dec(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos[None])
    logits = model.lm_head(lm.norm(hidden)).float()
    return log, plans, logits, pos, idx, lm_prompt_len


@torch.no_grad()
def oracle_illava(
    model,
    inputs,
    *,
    layer=(),
    keep=(),
    vit_layers=(),
    vit_merge=0,
    weights=None,
    padding=None,
    positions: str = "original",
    new_tokens=None,
    debias_stages: str = "first",
    vit_positions: str = "compact",
    decode_positions: str = "prompt",
) -> OracleResult:
    """iLLaVA (hulianyuyy/iLLaVA) on one LLaVA sample, vision tower and decoder layers run by hand.

    layer: int or list of decoder layers K BEFORE which the LLM stage merges and cuts (official image setting: one
        stage, K=8 on Qwen2-7B); scored with the attention of layer K-1. ``()`` = no LLM stage.
    keep: int or list, visual tokens present after each LLM stage; ``present - keep`` are merged away
        (official ``illava_llm_r``: a keep ratio in (0, 1), r = round(L * (1 - ratio)), or a count > 1 of merged).
    vit_layers: vision-encoder layers (0-based, each <= N-2 for ``vision_feature_layer=-2``) that merge inside the
        layer (official images: 5, 6, 7, 8); ``()`` = no ViT stage (the tower then runs unmodified).
    vit_merge: int or list, patches merged away in each of ``vit_layers`` (official ``illava_vit_r`` = 92).
    weights, padding: (V,) debias weights / padding mask on the LLM-stage score (see module docstring); counts
        unchanged. debias_stages: "first" (default) or "all" LLM stages.
    positions: LLM-stage positions after the cut: "original" (official) or "compact".
    vit_positions: LM-input positions after the ViT cut: "compact" (official / HF) or "original" (prompt indices).
    new_tokens: (1, T) appended tokens; plans from the prompt alone, then prompt + new tokens replayed.
    decode_positions: "prompt" (contract: appended tokens numbered from the full prompt length, as HF generate's
        cache_position does) or "lm_input" (official: from the length of the ViT-shortened LM input). Only matters
        with a ViT stage and ``vit_positions="compact"``.

    Returns OracleResult: one stage per ViT merging layer, then one per LLM stage (``extra["stage_kinds"]``).
    ``kept[s]``: original visual indices present after stage s; ``scores[s]``: the raw score (ViT: attention
    received; LLM: last-token attention), nan for absent tokens. ``extra``: "merges" (per stage: destination,
    members best-first with the destination first, weights), "merged_values" (per stage {destination: value};
    vision-tower hidden size for ViT stages, LM hidden size for LLM stages), "ranking" (LLM stages: the score after
    debiasing), "position_ids" and "token_index" (final sequence: position ids, original prompt index or
    prompt_len + t), "lm_input_length" (prompt length seen by the language model).
    """
    ids = inputs["input_ids"]
    assert ids.shape[0] == 1, "oracle handles batch size 1"
    layers = [layer] if isinstance(layer, int) else [int(x) for x in layer]
    keeps = _as_list(keep, len(layers), "keep")
    vit_layers = [int(x) for x in vit_layers]
    vit_merge = _as_list(vit_merge, len(vit_layers), "vit_merge")
    n_layers = len(model.model.language_model.layers)
    if any(not 1 <= k < n_layers for k in layers) or layers != sorted(set(layers)):
        raise ValueError(f"layer: increasing decoder layers in 1..{n_layers - 1}")
    if vit_layers != sorted(set(vit_layers)):
        raise ValueError("vit_layers must be increasing")
    for name, value, allowed in (("positions", positions, ("original", "compact")),
                                 ("vit_positions", vit_positions, ("original", "compact")),
                                 ("decode_positions", decode_positions, ("prompt", "lm_input")),
                                 ("debias_stages", debias_stages, ("first", "all"))):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, not {value!r}")
    cfg = dict(
        layers=layers, keeps=keeps, vit_layers=vit_layers, vit_merge=vit_merge, weights=weights, padding=padding,
        positions=positions, debias_stages=debias_stages, vit_positions=vit_positions,
        decode_positions=decode_positions,
    )
    prompt_len = ids.shape[1]
    pixels = inputs["pixel_values"]
    log, plans, logits, pos, idx, lm_len = _run(model, ids, pixels, prompt_len, cfg)
    if new_tokens is not None:
        full = torch.cat([ids, new_tokens.to(ids.device)], dim=1)
        _, plans, logits, pos, idx, _ = _run(model, full, pixels, prompt_len, cfg, fixed=plans)

    cpu = lambda t: t.detach().cpu()  # noqa: E731
    kept, scores, merges, values, ranking = [], [], [], [], []
    for entry in log:
        kept.append(torch.sort(cpu(entry["kept"])).values.long())
        scores.append(cpu(entry["score"]).float())
        merges.append(entry["merge"])
        values.append({k: cpu(v) for k, v in entry["merged_values"].items()})
        ranking.append(None)
    present = set(kept[-1].tolist()) if kept else set(range(int((ids[0] == model.config.image_token_id).sum())))
    for plan in plans:
        tail = plan["tail"].tolist()
        present -= set(tail[1:])
        kept.append(torch.tensor(sorted(present), dtype=torch.long))
        scores.append(cpu(plan["score"]).float())
        merges.append(dict(destination=tail[0], members=tail, weights=plan["weights"].tolist()))
        values.append({tail[0]: cpu(plan["value"])})
        ranking.append(cpu(plan["ranking"]).float())
    return OracleResult(
        kept=kept,
        scores=scores,
        logits=logits,
        extra={
            "stage_kinds": ["vit"] * len(log) + ["llm"] * len(plans),
            "merges": merges,
            "merged_values": values,
            "ranking": ranking,
            "position_ids": cpu(pos),
            "token_index": cpu(idx),
            "lm_input_length": lm_len,
        },
    )
