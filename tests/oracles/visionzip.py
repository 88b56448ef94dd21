"""Independent reference ("oracle") for VisionZip, written from the official code, not from vtprune.

Source (pinned): github.com/dvlab-research/VisionZip @ 3151f6d (main). Notes: /work/notes/visionzip.md.
- visionzip/main.py ``visionzip(model, dominant, contextual)``: ``apply_info(..., dominant_num=dominant - 1,
  contextual_num=contextual)``: the user-facing ``dominant`` COUNTS the [CLS] token (README: dominant=54,
  contextual=10 -> 64 tokens; 192 = 162+30, 128 = 108+20 per the paper).
- visionzip/utils.py ``CLIPAttention_forward`` returns ``raw_key_states.mean(1)`` (keys k_proj(layer_norm1(x)),
  before the query scaling, averaged over heads -> (B, 1+P, head_dim)); ``CLIP_EncoderLayer_forward`` stores it
  as ``layer.metric`` only in the layer whose ``r`` is 1: ``model.r = [0]*22 + [1] + [0]`` -> ``layers[-2]``
  of the 24-layer CLIP-L tower (hard-coded; with a 2-layer tower the official code would never set ``metric``).
- visionzip/clip_encoder.py ``CLIPVisionTower_VisionZip.forward`` (4-D tensor path):
  1. ``attn_weights = attentions[-2]`` (softmax probabilities inside ``layers[-2]``, over all 1+P keys, CLS
     included), ``hidden_states = hidden_states[-2]`` (the output of ``layers[-2]``: LLaVA's feature layer),
     ``metric = layers[-2].metric``.
  2. dominant: ``cls_attention = attn_weights[:, :, 0, 1:]``, SUM over heads, ``topk(dominant_num) + 1``;
     ``all_indices = [0 (CLS)] + topk``; ``dominant_tokens = hidden_states.masked_select(...)`` -> the CLS
     token and the dominant patches in index order (CLS first).
  3. the rest ("filtered": non-dominant patches, index order, CLS excluded) -> keys L2-normalised (cosine);
     ``step = max(1, R // contextual_num)``, targets = ``arange(0, R, step)[:contextual_num]`` (positions in
     the filtered list); every other filtered token is assigned to the target with the largest cosine
     similarity (argmax: first maximum); ``contextual = target_hidden + sum(assigned hidden) / max(count, 1)``
     (the target's feature PLUS the mean of its members; not the mean over target and members).
  4. output = ``cat([dominant_tokens, contextual_tokens])``: [CLS, dominant patches by index, contextual tokens
     in target order], all pre-projector features of layer -2.
- visionzip/llava_arch.py ``encode_images_visionzip``: ``mm_projector`` on that output (merging happened
  BEFORE the non-linear projector); ``prepare_inputs_labels_for_multimodal_visionzip`` splices the
  (dominant + contextual) embeddings in place of the image, ``position_ids = arange(0, cur_len)`` -> compact.

Deliberate choices / generalisations (not in the official code):
- ``include_cls=False``: no CLS token; ``dominant`` patches are all selected by attention. Total image tokens
  stay ``dominant + contextual``. (``include_cls=True`` is the official behaviour.)
- ``contextual=0``: no contextual tokens, the non-dominant patches are dropped (official: division by zero).
- ``padding`` / ``weights``: no published debias patch exists for VisionZip. If given, they act on the
  dominant-selection score before top-k (score *= weights; score[padding] = 0); the contextual merge is
  unchanged (padding patches can still be merged). The dominant count is NOT lowered unless
  ``lower_keep=True`` (then dominant patches = min(count, non-padding patches); the remainder is merged).
- ``positions="original"`` (not official): text tokens and dominant patches keep their prompt position ids;
  the CLS token takes the position id of its image's first placeholder; a contextual token takes the position
  id of its target patch's placeholder. Causality always follows sequence order.
- Ties in the dominant top-k -> lower index first (stable sort). Score maths in float32.
- Several images: each image on its own (official: per-row topk of the 4-D batch); visual index = image*P + p.
- The layer used is LLaVA's ``vision_feature_layer`` (must be negative; -2 = the official hard-coded layer).

The CLIP tower and the decoder are run by hand, so eager and sdpa models give the same answer.
"""

from __future__ import annotations


import torch

from .common import OracleResult


def _clip_by_hand(model, pixel_values):
    """CLIP vision tower layer by layer: states[0] = pre_layrnorm(embeddings), states[i + 1] = output of layer i
    (the ``hidden_states`` tuple of CLIPVisionModel with output_hidden_states=True)."""
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    h = vm.pre_layrnorm(vm.embeddings(pixel_values.to(vm.pre_layrnorm.weight.dtype)))
    states = [h]
    for layer in vm.encoder.layers:
        out = layer(h, attention_mask=None)
        h = out[0] if isinstance(out, tuple) else out
        states.append(h)
    return states, list(vm.encoder.layers)


def _attention_and_keys(layer, layer_input):
    """What utils.py::CLIPAttention_forward exposes for ``layer``:
    - the [CLS] query's softmax probabilities over all 1+P keys, (B, heads, 1+P) float32
      (q = q_proj(x) * scale, k = k_proj(x), x = layer_norm1(input); no mask in the vision tower);
    - the metric: raw keys k_proj(x) averaged over heads, (B, 1+P, head_dim) float32."""
    attn = layer.self_attn
    x = layer.layer_norm1(layer_input).float()
    b, n, _ = x.shape
    heads, hd = attn.num_heads, attn.head_dim
    q = torch.nn.functional.linear(x, attn.q_proj.weight.float(), attn.q_proj.bias.float())
    k = torch.nn.functional.linear(x, attn.k_proj.weight.float(), attn.k_proj.bias.float())
    q = q.view(b, n, heads, hd).transpose(1, 2)
    k = k.view(b, n, heads, hd).transpose(1, 2)  # (B, H, 1+P, hd)
    probs = torch.softmax((q[:, :, :1] * attn.scale) @ k.transpose(-1, -2), dim=-1)[:, :, 0]
    return probs, k.mean(dim=1)


def _stable_topk(score, k):
    """Indices of the k largest entries, ties -> lower index first, returned sorted ascending."""
    order = torch.sort(score, descending=True, stable=True).indices
    return torch.sort(order[:k]).values


def _run_decoder(model, hidden, positions):
    """Decoder layers by hand (tests/test_engine.py::oracle_logits): explicit 4-D causal mask for eager,
    None (is_causal) for sdpa. Causality follows sequence order, whatever the position ids are."""
    lm = model.model.language_model
    eager = model.config._attn_implementation == "eager"
    n = hidden.shape[1]
    mask = None
    if eager:
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        mask = torch.where(causal, 0.0, torch.finfo(hidden.dtype).min)[None, None].to(hidden.dtype)
    cos, sin = lm.rotary_emb(hidden, positions[None])
    for layer in lm.layers:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=positions[None])
    return model.lm_head(lm.norm(hidden)).float()


def oracle_visionzip(
    model,
    inputs,
    *,
    dominant,
    contextual,
    weights=None,
    padding=None,
    positions="compact",
    new_tokens=None,
    new_token_positions="uncut",
    include_cls=True,
    lower_keep=False,
) -> OracleResult:
    """VisionZip on one sample (batch 1, one or several images), tokens removed/merged before the language model.

    dominant: dominant tokens PER IMAGE as in the official ``visionzip(model, dominant=...)``: with
        ``include_cls=True`` (official) this counts the [CLS] token, i.e. ``dominant - 1`` patches are selected
        by [CLS] attention and the CLS feature itself is fed first. LLaVA-1.5: 162/108/54.
    contextual: contextual (merged) tokens per image; LLaVA-1.5: 30/20/10. Image tokens fed per image =
        dominant + contextual.
    weights / padding: (V,) debias weights / bool padding mask applied to the dominant-selection score before
        top-k (not official; see module docstring). lower_keep: lower the dominant patch count to the
        non-padding patches.
    positions: "compact" (official) or "original" (see module docstring).
    new_tokens: (1, T) tokens appended after the prompt; selection/merge made once, computation replayed.
    new_token_positions: "uncut" (contract: appended token t has id N_prompt + t) or "shifted" (official LLaVA
        generate: continues the shortened numbering, id N_short + t).

    Returns OracleResult with one stage (layer 0 = the language model's input):
        kept[0]   sorted visual indices of the dominant PATCHES (their own features reach the LM unchanged);
        scores[0] (V,) raw [CLS] attention summed over heads (float32);
        logits    (1, N_final, vocab);
        extra:    "cls" (per image: sequence index of the CLS token in the final sequence, or None),
                  "contextual" (list over all images of dicts: image, target (visual index), members (visual
                  indices merged into it, target excluded), seq_index, position_id),
                  "contextual_features" (C, D_vision) pre-projector merged features,
                  "contextual_embeds" (C, D_lm) their projections (what the LM receives),
                  "cls_embeds" (n_images, D_lm) or None, "ranking", "position_ids", "num_visual",
                  "patches_per_image", "vision_layer", "dominant_patches_per_image", "merged_values" ({}: no
                  kept token is changed by VisionZip).
    """
    assert positions in ("compact", "original")
    assert new_token_positions in ("uncut", "shifted")
    base = model.model
    ids = inputs["input_ids"]
    assert ids.shape[0] == 1, "batch size 1"
    n_prompt = ids.shape[1]
    is_image = ids[0] == model.config.image_token_id
    V = int(is_image.sum())
    pixel_values = inputs["pixel_values"]
    n_images = pixel_values.shape[0]
    assert V % n_images == 0
    P = V // n_images
    feature_layer = model.config.vision_feature_layer
    assert isinstance(feature_layer, int) and feature_layer < 0, "official: hidden_states[-2] / attentions[-2]"
    contextual = int(contextual)
    n_dom_patches = int(dominant) - (1 if include_cls else 0)  # main.py: dominant_num = dominant - 1
    assert 0 <= n_dom_patches <= P and contextual >= 0

    with torch.no_grad():
        states, vlayers = _clip_by_hand(model, pixel_values)
        layer_index = len(vlayers) + feature_layer  # layers[-2]: attentions[-2] / metric / output hidden_states[-2]
        hidden = states[feature_layer]  # (B, 1+P, C) = hidden_states[-2], CLS at 0
        assert hidden.shape[1] == P + 1, "image tokens in the prompt must match the patches of each image"
        probs, metric = _attention_and_keys(vlayers[layer_index], states[layer_index])
        # clip_encoder.py: cls_attention = attn_weights[:, :, 0, 1:]; cls_attention.sum(dim=1)
        raw = probs[:, :, 1:].sum(dim=1).reshape(-1)  # (V,)

        ranking = raw.clone()
        if weights is not None:
            ranking = ranking * weights.float().reshape(-1)
        if padding is not None:
            ranking = torch.where(padding.bool().reshape(-1), torch.zeros_like(ranking), ranking)

        kept_parts, blocks, dom_counts = [], [], []
        ctx_features, cls_features = [], []
        for img in range(n_images):
            k = n_dom_patches
            if lower_keep and padding is not None:
                k = min(k, int((~padding.bool().reshape(-1)[img * P : (img + 1) * P]).sum()))
            dom_counts.append(k)
            # dominant: topk of the head-summed CLS attention (patch indices 0..P-1, sorted = masked_select order)
            dom = _stable_topk(ranking[img * P : (img + 1) * P], k)
            kept_parts.append(dom + img * P)
            # filtered: every patch not dominant (CLS excluded), in index order
            is_dom = torch.zeros(P, dtype=torch.bool)
            is_dom[dom] = True
            rest = torch.arange(P)[~is_dom]
            R = len(rest)
            items = []  # (kind, feature (C,), visual index or None, info)
            if include_cls:
                items.append(("cls", hidden[img, 0], None, None))
            for p in dom.tolist():
                items.append(("dominant", hidden[img, 1 + p], img * P + p, None))
            if contextual > 0 and R > 0:
                assert R >= contextual, "official code needs at least `contextual` non-dominant patches"
                keys = metric[img, 1 + rest]  # metric_filtered
                keys = keys / keys.norm(dim=-1, keepdim=True)  # metric_normalized (cosine similarity)
                step = max(1, R // contextual)
                target_pos = torch.arange(0, R, step)[:contextual]  # evenly strided in the filtered list
                is_target = torch.zeros(R, dtype=torch.bool)
                is_target[target_pos] = True
                other_pos = torch.arange(R)[~is_target]
                similarity = keys[other_pos] @ keys[target_pos].T  # (R - C, C)
                assign = similarity.argmax(dim=1) if len(other_pos) else torch.zeros(0, dtype=torch.long)
                for j, tp in enumerate(target_pos.tolist()):
                    members = rest[other_pos[assign == j]]
                    target = int(rest[tp])
                    value = hidden[img, 1 + target].clone()
                    if len(members):  # aggregated_hidden = sum / count (count clamped to >= 1)
                        value = value + hidden[img, 1 + members].mean(dim=0)
                    info = {"image": img, "target": img * P + target, "members": (members + img * P).tolist()}
                    items.append(("contextual", value, img * P + target, info))
            blocks.append(items)

        kept = torch.cat(kept_parts)
        projector = base.multi_modal_projector

        def build(token_ids):
            n_all = token_ids.shape[1]
            embeds = base.get_input_embeddings()(token_ids)[0]
            visual = torch.full((n_all,), -1, dtype=torch.long)
            visual[:n_prompt][is_image] = torch.arange(V)
            rows, pos, original, cls_seq, ctx_records = [], [], [], [], []
            for t in range(n_all):
                v = int(visual[t])
                if v < 0:
                    rows.append(embeds[t])
                    pos.append(t)
                    original.append(t)
                    continue
                if v % P != 0:
                    continue  # the whole replacement block is emitted at the image's first placeholder
                img = v // P
                first = t  # prompt position of this image's first placeholder
                for kind, feature, vis, info in blocks[img]:
                    emb = projector(feature[None])[0].to(embeds.dtype)  # mm_projector after the merge
                    seq = len(rows)
                    rows.append(emb)
                    original.append(t)  # counts as part of the prompt
                    if kind == "cls":
                        pos.append(first)
                        cls_seq.append(seq)
                    else:
                        pos.append(first + (vis - img * P))  # own / target placeholder position
                        if kind == "contextual":
                            ctx_records.append(dict(info, seq_index=seq, embed=emb))
            hidden_lm = torch.stack(rows)[None]
            original = torch.tensor(original)
            pos = torch.tensor(pos)
            appended = original >= n_prompt
            n_short_prompt = int((~appended).sum())
            if positions == "compact":
                position_ids = torch.arange(len(rows))  # arange(0, cur_len)
            else:
                position_ids = pos.clone()
            if new_token_positions == "uncut":
                position_ids[appended] = original[appended]
            else:
                position_ids[appended] = n_short_prompt + (original[appended] - n_prompt)
            for rec in ctx_records:
                rec["position_id"] = int(position_ids[rec["seq_index"]])
            return hidden_lm, position_ids, cls_seq, ctx_records

        token_ids = ids if new_tokens is None else torch.cat([ids, new_tokens.to(ids.device)], dim=1)
        hidden_lm, position_ids, cls_seq, ctx_records = build(token_ids)
        logits = _run_decoder(model, hidden_lm, position_ids)

        for items in blocks:
            for kind, feature, _, _ in items:
                if kind == "contextual":
                    ctx_features.append(feature)
                elif kind == "cls":
                    cls_features.append(feature)
        contextual_embeds = [rec.pop("embed") for rec in ctx_records]
        contextual_info = ctx_records
        cls_embeds = projector(torch.stack(cls_features)) if cls_features else None

    return OracleResult(
        kept=[kept],
        scores=[raw.float()],
        logits=logits,
        extra={
            "cls": cls_seq if include_cls else [None] * n_images,
            "cls_embeds": cls_embeds,
            "contextual": contextual_info,
            "contextual_features": torch.stack(ctx_features) if ctx_features else hidden.new_zeros(0, hidden.shape[-1]),
            "contextual_embeds": torch.stack(contextual_embeds) if contextual_embeds else None,
            "merged_values": [{}],
            "ranking": ranking.float(),
            "position_ids": position_ids,
            "num_visual": V,
            "patches_per_image": P,
            "vision_layer": layer_index,
            "dominant_patches_per_image": dom_counts,
        },
    )
