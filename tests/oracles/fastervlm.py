"""Independent reference ("oracle") for FasterVLM, written from the official code, not from vtprune.

Source (pinned): github.com/Theia-4869/FasterVLM @ f5d5f12 (main; the FasterVLM logic is unchanged since the
first commit a10e0b7 except that the kept indices are no longer sorted before the boolean mask, which has no
effect on the order). Notes: /work/notes/fastervlm.md.
- llava/model/multimodal_encoder/clip_encoder.py ``CLIPVisionTower.forward`` / ``feature_select``: the CLIP
  tower runs with ``output_attentions=True, output_hidden_states=True``; features = ``hidden_states[L]`` and
  attentions = ``attentions[L]`` with the same index L = ``mm_vision_select_layer`` (-2 for LLaVA-1.5), i.e. the
  feature of layer ``layers[-2]``'s output and the softmax attention probabilities INSIDE that same layer;
  'patch': features ``[:, 1:]``, attentions ``[:, :, 0, 1:]`` (the [CLS] query row, patch columns; the softmax
  was over all 1+P keys, CLS included; nothing is renormalised).
- llava/model/llava_arch.py ``LlavaMetaForCausalLM.encode_images``: score = mean over heads; ``torch.topk(score,
  k=visual_token_num)``; boolean index mask; every patch is projected (``mm_projector``) and
  ``prepare_inputs_labels_for_multimodal`` keeps ``image_feature[index_mask]``, i.e. the kept tokens in patch
  (row-major) order, and splices them in place of the image; ``position_ids = arange(0, cur_len)`` over the
  shortened sequence -> compact positions.
- llava/model/language_model/llava_llama.py: ``visual_token_num`` = tokens kept PER IMAGE (script argument,
  e.g. 576*(1-0.75)=144, 576*(1-0.9)=58 (rounded), 576*(1-0.95)=29).

Deliberate choices / generalisations (not in the official code):
- ``padding`` / ``weights``: no published debias patch exists for FasterVLM. They are applied, if given, to the
  ranking score before top-k (the place every published patch uses: the method's own score vector): score *=
  weights; score[padding] = 0. The keep count is NOT lowered unless ``lower_keep=True`` (then, per image,
  keep = min(keep, number of non-padding patches), FastV style).
- Ties (only after padding zeroing in practice) are broken toward the lower index (stable sort); CUDA topk has
  no specified tie order.
- Several images in one prompt: each image is pruned on its own to ``keep`` tokens (official 4-D batch path:
  topk per row). V = all image tokens of the prompt; visual index = image * P + patch index.
- Score maths in float32 (official: fp16 softmax/mean).

The CLIP tower and the decoder are run by hand (no attention weights are taken from the model), so eager and
sdpa models give the same answer.
"""

from __future__ import annotations


import torch

from .common import OracleResult


def _clip_by_hand(model, pixel_values):
    """Runs the CLIP vision tower layer by layer. Returns (hidden_states list, layer modules) where
    hidden_states[0] = pre_layrnorm(embeddings) and hidden_states[i + 1] = output of layer i, exactly the
    ``hidden_states`` tuple of ``CLIPVisionModel(..., output_hidden_states=True)``."""
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    h = vm.pre_layrnorm(vm.embeddings(pixel_values.to(vm.pre_layrnorm.weight.dtype)))
    states = [h]
    for layer in vm.encoder.layers:
        out = layer(h, attention_mask=None)
        h = out[0] if isinstance(out, tuple) else out
        states.append(h)
    return states, list(vm.encoder.layers)


def _cls_attention(layer, layer_input):
    """Softmax attention probabilities of the [CLS] query inside ``layer``: (B, heads, 1+P) float32.

    CLIPAttention (eager, as used by the official code with output_attentions=True): x = layer_norm1(input);
    q = q_proj(x) * scale, k = k_proj(x); softmax over all 1+P keys (no mask in the vision tower)."""
    attn = layer.self_attn
    x = layer.layer_norm1(layer_input).float()
    b, n, _ = x.shape
    heads, hd = attn.num_heads, attn.head_dim
    q = torch.nn.functional.linear(x, attn.q_proj.weight.float(), attn.q_proj.bias.float())
    k = torch.nn.functional.linear(x, attn.k_proj.weight.float(), attn.k_proj.bias.float())
    q = q.view(b, n, heads, hd).transpose(1, 2)[:, :, :1]  # CLS query only
    k = k.view(b, n, heads, hd).transpose(1, 2)
    logits = (q * attn.scale) @ k.transpose(-1, -2)  # (B, H, 1, 1+P)
    return torch.softmax(logits, dim=-1)[:, :, 0]


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


def oracle_fastervlm(
    model,
    inputs,
    *,
    keep,
    weights=None,
    padding=None,
    positions="compact",
    new_tokens=None,
    new_token_positions="uncut",
    lower_keep=False,
) -> OracleResult:
    """FasterVLM on one sample (batch 1, one or several images), tokens removed before the language model.

    keep: visual tokens kept PER IMAGE (official ``visual_token_num``; LLaVA-1.5 runs: 288/144/58/29 for
        50/75/90/95% reduction; the 192/128/64 budgets of other papers are the same knob).
    weights: (V,) multiplicative debias weights, multiplied into the head-mean [CLS] attention before top-k.
    padding: (V,) bool, True = padding patch: its score is set to 0 before top-k (NOT in the official code).
    positions: "compact" (official: position ids 0..n-1 over the shortened sequence) or "original" (every kept
        token keeps its prompt position id).
    new_tokens: (1, T) tokens appended after the prompt; the selection (text-agnostic anyway) is made once and
        the computation replayed on prompt + new_tokens.
    new_token_positions: "uncut" (the oracle contract: appended token t has id N_prompt + t) or "shifted" (what
        the official LLaVA generate does: decoding continues the shortened numbering, id N_short + t).
    lower_keep: with padding, keep min(keep, number of non-padding patches) per image (not official).

    Returns OracleResult with one stage (layer 0 = the language model's input):
        kept[0]   sorted visual indices kept; scores[0] (V,) raw head-mean [CLS] attention (float32);
        logits    (1, N_final, vocab); extra: "ranking" (the score actually ranked), "position_ids",
        "num_visual", "patches_per_image", "vision_layer" (index of the CLIP layer used), "keep_per_image".
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
    select_layer = model.config.vision_feature_layer
    assert isinstance(select_layer, int), "one vision feature layer (LLaVA-1.5: -2)"
    assert model.config.vision_feature_select_strategy == "default", "'patch' strategy: CLS dropped"

    with torch.no_grad():
        # clip_encoder.py::CLIPVisionTower.forward / feature_select
        states, vlayers = _clip_by_hand(model, pixel_values)
        features = states[select_layer][:, 1:]  # hidden_states[L][:, 1:]  (B, P, C)
        attn_index = select_layer % len(vlayers)  # attentions[L]: the layer inside which the attention is taken
        cls_attn = _cls_attention(vlayers[attn_index], states[attn_index])[:, :, 1:]  # attentions[L][:, :, 0, 1:]
        assert features.shape[1] == P, "image tokens in the prompt must match the patches of each image"
        # llava_arch.py::encode_images: image_attentions.mean(dim=1)  -> (B, P)
        raw = cls_attn.mean(dim=1).reshape(-1)  # (V,) in visual-index order

        ranking = raw.clone()
        if weights is not None:
            ranking = ranking * weights.float().reshape(-1)
        if padding is not None:
            ranking = torch.where(padding.bool().reshape(-1), torch.zeros_like(ranking), ranking)

        # topk per image (visual_token_num per image) -> index mask -> kept in patch order
        kept_parts, keep_per_image = [], []
        for img in range(n_images):
            k = int(keep)
            if lower_keep and padding is not None:
                k = min(k, int((~padding.bool().reshape(-1)[img * P : (img + 1) * P]).sum()))
            assert 0 <= k <= P
            keep_per_image.append(k)
            kept_parts.append(_stable_topk(ranking[img * P : (img + 1) * P], k) + img * P)
        kept = torch.cat(kept_parts)

        # every patch projected, then image_feature[index_mask] (mm_projector is per token)
        image_embeds = base.multi_modal_projector(features).reshape(V, -1)

        def build(token_ids):
            n_all = token_ids.shape[1]
            embeds = base.get_input_embeddings()(token_ids)[0]
            rows, pos = [], []
            visual = torch.full((n_all,), -1, dtype=torch.long)
            visual[:n_prompt][is_image] = torch.arange(V)
            keep_set = set(kept.tolist())
            for t in range(n_all):
                v = int(visual[t])
                if v < 0:
                    rows.append(embeds[t])
                    pos.append(t)
                elif v in keep_set:
                    rows.append(image_embeds[v].to(embeds.dtype))
                    pos.append(t)
            hidden = torch.stack(rows)[None]
            original = torch.tensor(pos)
            n_short_prompt = int((original < n_prompt).sum())
            if positions == "compact":
                position_ids = torch.arange(len(pos))  # prepare_inputs_labels_for_multimodal: arange(cur_len)
            else:
                position_ids = original.clone()
            appended = original >= n_prompt
            if new_token_positions == "uncut":
                position_ids[appended] = original[appended]  # N_prompt + t, as HF generate numbers them
            else:
                position_ids[appended] = n_short_prompt + (original[appended] - n_prompt)
            return hidden, position_ids

        token_ids = ids if new_tokens is None else torch.cat([ids, new_tokens.to(ids.device)], dim=1)
        hidden, position_ids = build(token_ids)
        logits = _run_decoder(model, hidden, position_ids)

    return OracleResult(
        kept=[kept],
        scores=[raw.float()],
        logits=logits,
        extra={
            "ranking": ranking.float(),
            "position_ids": position_ids,
            "num_visual": V,
            "patches_per_image": P,
            "vision_layer": attn_index,
            "keep_per_image": keep_per_image,
        },
    )
