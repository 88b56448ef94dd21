"""Independent reference ("oracle") for DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language
Models: Duplication Matters More", arXiv 2502.11494, EMNLP 2025).

Written from the official LLaVA code of ZichenWen1/DART (read at upstream commit 5a19452, via the fork
xqy1111111/DART whose later commits do not touch these files):
  llava/model/language_model/modeling_llama_self.py   DART.forward, DART.get_retained_image_token,
                                                      LlamaSdpaAttention.forward / LlamaDecoderLayer.forward (the
                                                      "# ! debug" extra outputs: layer_outputs[-2] = key_states)
  llava/eval/model_vqa_loader.py                      configure_DART, argparse defaults
  scripts/v1_5/eval/*.sh                              K=2, start 35, length 576, 4+4 pivots, max_num_trunction=$2
Notes: /work/notes/dart.md.

The decoder layers are run by hand and the visual tokens that are not kept are physically removed, as in
tests/test_engine.py::oracle_logits.  Batch size 1, no padding in the batch, one contiguous image block.

Deliberate generalisations / choices (the official code has no equivalent):
- The image block is located from input_ids (official: hard-coded start 35 / length 576 of the vicuna_v1 prompt,
  which is where the block is in that prompt).  Text pivot candidates are all prompt tokens after the block.
- Ties: torch.topk on CUDA has no specified tie order; here ties go to the earlier candidate (stable sort).
- Precision: official runs fp16; here everything is float32.
- `pivot_order="ranked"` and `positions="compact"` are options the official code does not have.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .common import OracleResult


def _post_rope_keys(layer, hidden_in, positions, rotary_emb):
    """Keys of `layer` as the official attention returns them (modeling_llama_self.py, LlamaSdpaAttention.forward /
    LlamaAttention.forward, returned as the 5th attention output and surfaced as layer_outputs[-2]):
    k_proj(input_layernorm(h)) -> RoPE at the current position ids -> repeat_kv.  Then DART.get_retained_image_token
    does any_states.permute(0, 2, 1, 3).reshape(B, N, H * head_dim): one row per token, all heads concatenated.
    Returns (n, H * head_dim) float32."""
    attn = layer.self_attn
    head_dim = attn.head_dim
    normed = layer.input_layernorm(hidden_in)
    n = normed.shape[1]
    q = attn.q_proj(normed).view(1, n, -1, head_dim).transpose(1, 2)
    k = attn.k_proj(normed).view(1, n, -1, head_dim).transpose(1, 2)
    cos, sin = rotary_emb(normed, positions[None])
    _, k = apply_rotary_pos_emb(q, k, cos, sin)  # AFTER RoPE (original position ids: no cut happened before)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # repeat_kv (eager/sdpa); a no-op for MHA LLaVA-1.5
    return k[0].permute(1, 0, 2).reshape(n, -1).float()


def _top(values, k):
    """torch.topk(values, k).indices with ties toward the lower index (stand-in for CUDA topk)."""
    return torch.sort(values, descending=True, stable=True).indices[:k]


def oracle_dart(
    model,
    inputs,
    *,
    layer=2,
    keep,
    pivot_image=4,
    pivot_text=4,
    per_pivot=None,
    pivot_order="official",
    weights=None,
    padding=None,
    positions="original",
    new_tokens=None,
) -> OracleResult:
    """DART by hand (one stage).

    layer: cut before 0-based decoder layer `layer` (official K=2: DART.forward prunes when
        decoder_layer.self_attn.layer_idx == K, before running it, using layer_outputs of layer K-1).
        Layers 0..layer-1 see every token.
    keep: the official budget `max_num_trunction` (scripts: 192/128/64).  It is NOT the kept count: official
        TOKEN_TOPK = ceil(max_num_trunction // (pivot_image + pivot_text)) (a floor), and the kept visual count is
        pivot_image + (pivot_image + pivot_text) * TOKEN_TOPK (128 -> 4 + 8*16 = 132; 192 -> 196; 64 -> 68).
    pivot_image / pivot_text: number of visual / text pivots (official 4 / 4).
    per_pivot: override TOKEN_TOPK (tokens each pivot claims); None = the official formula above.
    pivot_order: the order in which pivots claim tokens (it matters: each pivot removes its picks from the pool).
        "official": `for item in list(indices_set)`, indices_set = set(image_indices + query_indices) of ABSOLUTE
        sequence indices -> CPython set iteration order (reproduced here by building the same Python set).
        "ranked": image pivots by descending key norm, then text pivots by descending key norm.
    weights / padding: no debiasing patch exists for DART (intcomp/attention-bias has none); must be None.
    positions: "original" (official: position_ids = keep_indexs) or "compact" (renumbered 0..n-1).
    new_tokens: (1, T) tokens appended after the prompt; selection from the prompt only, then replayed; appended
        token t has position id N + t (N = uncut prompt length), which is also what the official decode gives
        (HF generate builds position ids from the full-length attention mask).

    Returns OracleResult with kept=[visual indices], scores=[(V,) L1 norm of the layer-(layer-1) post-RoPE keys of
    the visual tokens (the visual-pivot criterion)], and extra (pivots, order, per-pivot picks, similarities).
    """
    if weights is not None or padding is not None:
        raise ValueError("DART has no published debiasing patch; weights/padding must be None")
    assert positions in ("original", "compact")
    assert pivot_order in ("official", "ranked")
    base = model.model
    lm = base.language_model
    ids = inputs["input_ids"]
    assert ids.shape[0] == 1, "batch size 1"
    n_prompt = ids.shape[1]
    is_image = ids[0] == model.config.image_token_id
    V = int(is_image.sum())
    img_pos = torch.nonzero(is_image).flatten()  # absolute sequence index of visual index 0..V-1
    start = int(img_pos[0])
    assert torch.equal(img_pos, torch.arange(start, start + V)), "one contiguous image block"
    assert 0 < layer < len(lm.layers), "DART needs the layer before the cut (its keys and output)"
    eager = model.config._attn_implementation == "eager"

    # get_retained_image_token: TOKEN_TOPK = math.ceil(MAX_NUM_TRUNCTION // (pivot_image_token + pivot_text_token))
    token_topk = int(per_pivot) if per_pivot is not None else int(keep) // (pivot_image + pivot_text)

    # Embeddings: LLaVA splices the projector output into the placeholder rows (llava_arch.py; HF LlavaModel.forward)
    image_features = torch.cat(list(base.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output))

    def embed(token_ids):
        e = base.get_input_embeddings()(token_ids)
        e[0, token_ids[0] == model.config.image_token_id] = image_features.to(e.dtype)
        return e

    def run_layer(layer_module, hidden, pos):
        n = hidden.shape[1]
        cos, sin = lm.rotary_emb(hidden, pos[None])
        mask = None
        if eager:  # explicit 4-D additive causal mask (rows are in sequence order), as test_engine.py::oracle_logits
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            mask = torch.where(causal, 0.0, torch.finfo(hidden.dtype).min)[None, None].to(hidden.dtype)
        return layer_module(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos[None])

    def select(hidden_in, hidden_out):
        """DART.get_retained_image_token on the prompt.  hidden_in / hidden_out: input / output of layer `layer`-1."""
        # any_states = layer_outputs[-2]: keys of layer K-1 after RoPE (position ids arange(N): nothing cut yet)
        keys = _post_rope_keys(lm.layers[layer - 1], hidden_in, torch.arange(n_prompt), lm.rotary_emb)
        # last_layer_state = self.norm(layer_outputs[0]): layer K-1 output through the FINAL RMSNorm (model.norm)
        state = lm.norm(hidden_out)[0].float()
        # k_states_image_token / k_states_query_token: L1 norm (torch.norm(p=1)) over all heads of each token's key
        l1 = keys.abs().sum(dim=-1)
        l1_image = l1[start : start + V]
        l1_query = l1[start + V :]  # every prompt token after the image block is a text-pivot candidate
        assert pivot_image <= V and pivot_text <= l1_query.numel(), "official topk would fail"
        image_indices = (_top(l1_image, pivot_image) + start).tolist()  # absolute sequence indices, norm order
        query_indices = (_top(l1_query, pivot_text) + start + V).tolist()
        indices_set = set(image_indices + query_indices)
        # valid_indices = image positions minus the image pivots (pivots keep themselves, are not candidates)
        valid_indices = set(range(start, start + V)) - set(image_indices)
        valid_indices_list = list(valid_indices)
        order = list(indices_set) if pivot_order == "official" else image_indices + query_indices
        picks, sims = [], []
        for item in order:
            if token_topk > len(valid_indices_list):
                raise ValueError(f"a pivot must claim {token_topk} tokens but only {len(valid_indices_list)} remain")
            candidates = valid_indices_list
            valid_vectors = state[candidates]
            # cos_sim = -cosine_similarity(pivot, candidates); topk(TOKEN_TOPK) -> the LEAST similar candidates
            cos = F.cosine_similarity(state[item][None], valid_vectors, dim=-1)
            top = _top(-cos, token_topk)
            real = [candidates[i] for i in top.tolist()]
            indices_set.update(real)  # a pivot's picks leave the pool: later pivots cannot claim them again
            picks.append(torch.tensor([r - start for r in real], dtype=torch.long))
            sim = torch.full((V,), float("nan"))  # cosine to this pivot of every candidate it saw; nan otherwise
            sim[torch.tensor(candidates, dtype=torch.long) - start] = cos
            sims.append(sim)
            valid_indices.difference_update(real)
            valid_indices_list = list(valid_indices)
        indices_set.difference_update(query_indices)  # text pivots are not visual tokens: drop them
        kept = torch.sort(torch.tensor(sorted(indices_set), dtype=torch.long) - start).values
        extra = {
            "num_visual": V,
            "per_pivot": token_topk,
            "pivots_image": torch.tensor(image_indices, dtype=torch.long) - start,  # visual indices, norm order
            "pivots_text": torch.tensor(query_indices, dtype=torch.long),  # prompt sequence indices, norm order
            "pivot_order": list(order),  # absolute prompt sequence indices, in claiming order
            "picks": picks,  # per pivot (claiming order): visual indices claimed, least similar first
            "similarities": sims,  # per pivot (claiming order): (V,) cosine to the pivot; nan = not a candidate
            "text_key_l1": l1_query.clone(),
        }
        return kept, l1_image.clone(), extra

    def run(token_ids, kept=None):
        n_all = token_ids.shape[1]
        hidden = embed(token_ids)
        index = torch.arange(n_all)  # original sequence index of every row still present
        pos = torch.arange(n_all)  # prompt: arange(N); appended token t: N + t (HF generate)
        score = extra = None
        for i, layer_module in enumerate(lm.layers):
            if i == layer:
                rank = index - start
                is_vis = (index >= start) & (index < start + V)
                keep_row = ~is_vis | torch.isin(rank, kept)
                hidden, index = hidden[:, keep_row], index[keep_row]
                if positions == "original":
                    pos = index.clone()  # DART.forward: position_ids = keep_indexs.unsqueeze(0)
                else:
                    in_prompt = index < n_prompt
                    pos = index.clone()  # appended tokens keep N + t (contract)
                    pos[in_prompt] = torch.arange(int(in_prompt.sum()))
            hidden_out = run_layer(layer_module, hidden, pos)
            if kept is None and i == layer - 1:
                kept, score, extra = select(hidden, hidden_out)
            hidden = hidden_out
        logits = model.lm_head(lm.norm(hidden)).float()
        return kept, score, extra, logits, pos

    with torch.no_grad():
        kept, score, extra, logits, final_pos = run(ids)
        if new_tokens is not None and new_tokens.shape[1] > 0:
            _, _, _, logits, final_pos = run(torch.cat([ids, new_tokens.to(ids.device)], dim=1), kept=kept)
    extra["final_position_ids"] = final_pos
    extra["layer"] = layer
    return OracleResult(kept=[kept], scores=[score.float()], logits=logits, extra=extra)
