"""Attention rows recomputed from q.k equal the eager attention probabilities of the same layer."""

from __future__ import annotations

import torch
from conftest import inputs_for, make_image, prompt

from vtprune.adapters import adapter_for
from vtprune.core.scoring import attention_rows


def test_recomputed_rows_equal_eager_probabilities(processor, eager_model):
    images = [make_image(120, 60, seed=1), make_image(70, 70, seed=2)]
    texts = [prompt(), prompt("what shape is at the top left of the image ?")]
    inputs = inputs_for(processor, images, texts)  # left padding in sample 0
    assert (inputs["attention_mask"][0] == 0).any()
    with torch.no_grad():
        out = eager_model(**inputs, output_attentions=True, output_hidden_states=True)
    lm = eager_model.model.language_model
    adapter = adapter_for(eager_model)
    valid = inputs["attention_mask"].bool()
    n = valid.shape[1]
    position_ids = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    for layer_index in (0, 1, 3):
        hidden = out.hidden_states[layer_index]  # input of decoder layer `layer_index`
        cos, sin = lm.rotary_emb(hidden, position_ids)
        query = torch.tensor([[n - 1, n - 3, n - 10]] * 2)
        allowed = valid[:, None, :] & (torch.arange(n)[None, None, :] <= query[:, :, None])
        rows = attention_rows(adapter, lm.layers[layer_index], hidden, (cos, sin), query, allowed)
        expected = torch.gather(
            out.attentions[layer_index], 2, query[:, None, :, None].expand(-1, rows.shape[1], -1, n)
        )
        torch.testing.assert_close(rows, expected.float(), atol=1e-5, rtol=0)
