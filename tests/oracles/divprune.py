"""Independent reference ("oracle") for DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for
Large Multimodal Models", CVPR 2025, arXiv 2503.02175).

Written from the official code vbdi/divprune @ 799e2d9:
  LLaVA/llava/model/llava_arch.py   LlavaMetaForCausalLM.pairwise_cosine_similarity, .DivPrune,
                                    .prepare_inputs_labels_for_multimodal (the "#divprune" block at its end)
  LLaVA/llava/model/language_model/llava_llama.py   generate (position_ids stay None -> HF numbering)
  run_Divprune.sh                   LAYER_INDEX=0 (prune before the LLM), SUBSET_RATIO=0.098
Notes: /work/notes/divprune.md.

The pruning happens before the language model: the projector outputs of the visual tokens that are not selected are
removed from the input embeddings, and the decoder runs (by hand, as tests/test_engine.py::oracle_logits) on the
shortened sequence.  Batch size 1, no padding in the batch.

Deliberate choices (the official code has no equivalent):
- The image block is located from input_ids (official: hard-coded SYS_TOKEN_LEN = 35, the vicuna_v1 prompt).
- Precision: official fp16; here float32.  Ties in argmax go to the lowest index (torch.argmax's documented rule,
  made explicit here).
- A token picked twice (possible only when keep exceeds the number of distinct features) would appear twice in the
  official sequence; here `kept` is unique and extra["duplicate_picks"] says it happened.
- `positions="original"` and new_token_positions="uncut" are not what the official code does (see below).
"""

from __future__ import annotations


import torch

from .common import OracleResult


def divprune_select(features, keep):
    """llava_arch.py::DivPrune (max-min diversity, greedy farthest point), written out.

    features: (V, D) visual features (the projector output).  Returns (order, first_scores, gains, distance):
    order (keep,) visual indices in pick order; first_scores (V,) the step-0 score; gains (keep,) the winning score at
    each step; distance (V, V) = 1 - cosine similarity.
    """
    x = features.float()
    # pairwise_cosine_similarity: matrix / matrix.norm(dim=1, keepdim=True), then norm @ norm.T (no eps)
    unit = x / x.norm(dim=1, keepdim=True)
    distance = 1.0 - unit @ unit.t()  # cosine_matrix = 1.0 - pairwise_cosine_similarity(...)
    order, gains = [], []
    first_scores = None
    for i in range(keep):
        if i == 0:
            # scores = torch.topk(m2, 2, dim=0, largest=False).values[1, :]: per column the SECOND smallest
            # distance; the smallest is (about) the self-distance 0, so this is the distance to the nearest other
            # token.  The first pick is the most isolated token.
            scores = torch.topk(distance, 2, dim=0, largest=False).values[1, :]
            first_scores = scores.clone()
        else:
            # m2 = rows of the already selected tokens; scores = min over them (dim=0): each token's distance to
            # the selected set.  Already selected tokens score their self-distance (about 0), so are not re-picked.
            scores = distance[torch.tensor(order)].min(dim=0).values
        best = scores.max()
        pick = int(torch.nonzero(scores == best).flatten()[0])  # torch.argmax: first maximal index
        order.append(pick)
        gains.append(float(best))
    return torch.tensor(order, dtype=torch.long), first_scores, torch.tensor(gains), distance


def oracle_divprune(
    model,
    inputs,
    *,
    keep,
    weights=None,
    padding=None,
    positions="compact",
    new_tokens=None,
    new_token_positions="uncut",
) -> OracleResult:
    """DivPrune by hand (one stage, at the language model's input: stage layer 0).

    keep: number of visual tokens kept.  Official: threshold_terms = int(round(SUBSET_RATIO * 576)), SUBSET_RATIO
        0.098 -> 56 (paper main setting); 192/128/64 correspond to ratios 1/3, 2/9, 1/9.
    weights / padding: no debiasing patch exists for DivPrune (intcomp/attention-bias has none); must be None.
    positions: "compact" (official: the image simply has fewer rows, position_ids None -> HF numbers the shortened
        sequence 0..n'-1) or "original" (kept tokens and the text after the image keep their prompt ids).
    new_tokens: (1, T) tokens appended after the prompt; selection from the prompt only, then replayed.
    new_token_positions: "uncut" (the contract: appended token t has id N + t, N = uncut prompt length) or
        "shifted" (what the official generate does: HF numbers the shortened sequence, so appended token t has id
        n' + t, n' = prompt length after the cut).

    Returns OracleResult with kept=[sorted visual indices], scores=[(V,) step-0 score = cosine distance of each
    visual token to its nearest other visual token], extra: order (pick order), gains, distance, features.
    """
    if weights is not None or padding is not None:
        raise ValueError("DivPrune has no published debiasing patch; weights/padding must be None")
    assert positions in ("compact", "original")
    assert new_token_positions in ("uncut", "shifted")
    base = model.model
    lm = base.language_model
    ids = inputs["input_ids"]
    assert ids.shape[0] == 1, "batch size 1"
    n_prompt = ids.shape[1]
    is_image = ids[0] == model.config.image_token_id
    V = int(is_image.sum())
    img_pos = torch.nonzero(is_image).flatten()
    start = int(img_pos[0])
    assert torch.equal(img_pos, torch.arange(start, start + V)), "one contiguous image block"
    keep = int(keep)
    assert 0 < keep <= V
    eager = model.config._attn_implementation == "eager"

    with torch.no_grad():
        # encode_images = mm_projector(vision_tower(images)): LLaVA-1.5 "default" strategy (CLS dropped, layer -2)
        image_features = torch.cat(list(base.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output))
        # visual_tokens = new_input_embeds[0][SYS_TOKEN_LEN : SYS_TOKEN_LEN + img_feature_len]: the projector
        # output exactly as spliced into the LLM input embeddings
        order, first_scores, gains, distance = divprune_select(image_features, keep)
        # keep_indexs = cat(text before, selected + SYS_TOKEN_LEN, text after).sort(): prompt order
        kept = torch.unique(order)  # sorted
        duplicate = kept.numel() != order.numel()

        def run(token_ids):
            n_all = token_ids.shape[1]
            hidden = base.get_input_embeddings()(token_ids)
            hidden[0, token_ids[0] == model.config.image_token_id] = image_features.to(hidden.dtype)
            index = torch.arange(n_all)
            # new_input_embeds = new_input_embeds[:, keep_indexs]: drop the unselected visual rows BEFORE layer 0
            rank = index - start
            is_vis = (index >= start) & (index < start + V)
            keep_row = ~is_vis | torch.isin(rank, kept)
            hidden, index = hidden[:, keep_row], index[keep_row]
            in_prompt = index < n_prompt
            n_cut = int(in_prompt.sum())
            pos = torch.empty_like(index)
            pos[in_prompt] = torch.arange(n_cut) if positions == "compact" else index[in_prompt]
            if new_token_positions == "uncut":
                pos[~in_prompt] = index[~in_prompt]  # N + t
            else:
                pos[~in_prompt] = n_cut + (index[~in_prompt] - n_prompt)  # n' + t (HF generate, shortened prompt)
            for layer_module in lm.layers:
                n = hidden.shape[1]
                cos, sin = lm.rotary_emb(hidden, pos[None])
                mask = None
                if eager:  # explicit 4-D additive causal mask, as tests/test_engine.py::oracle_logits
                    causal = torch.ones(n, n, dtype=torch.bool).tril()
                    mask = torch.where(causal, 0.0, torch.finfo(hidden.dtype).min)[None, None].to(hidden.dtype)
                hidden = layer_module(
                    hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos[None]
                )
            return model.lm_head(lm.norm(hidden)).float(), pos

        token_ids = ids if new_tokens is None else torch.cat([ids, new_tokens.to(ids.device)], dim=1)
        logits, final_pos = run(token_ids)

    return OracleResult(
        kept=[kept],
        scores=[first_scores.float()],
        logits=logits,
        extra={
            "num_visual": V,
            "layer": 0,
            "order": order,  # visual indices in pick order (the official s tensor, minus SYS_TOKEN_LEN)
            "gains": gains,  # the winning (max-min) score at each pick
            "distance": distance,  # (V, V) 1 - cosine similarity of the projector outputs
            "features": image_features,
            "duplicate_picks": duplicate,
            "final_position_ids": final_pos,
        },
    )
