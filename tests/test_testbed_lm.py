"""testbed-lm building blocks (issue 13, in progress): LoRA factors start at the base model and merge exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from vtprune.testbed.lm import LoRALinear, add_lora, merge_lora


def test_lora_starts_at_the_base_layer_and_merges_exactly():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8)
    lora = LoRALinear(base, rank=4)
    x = torch.randn(3, 16)
    assert torch.equal(lora(x), base(x))  # B = 0 at the start
    with torch.no_grad():
        lora.lora_b.normal_()
    assert not torch.allclose(lora(x), base(x))
    torch.testing.assert_close(lora.merged()(x), lora(x), rtol=1e-5, atol=1e-5)


def test_lora_on_a_llama_merges_back_to_a_plain_model():
    torch.manual_seed(0)
    model = LlamaModel(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 50, (2, 7))
    params = add_lora(model.layers, rank=2)
    assert len(params) == 2 * 7 * 2
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.05)
        adapted = model(ids).last_hidden_state
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, adapted, rtol=1e-4, atol=1e-4)


def test_bad_rank():
    with pytest.raises(ValueError, match="rank=0"):
        LoRALinear(torch.nn.Linear(4, 4), rank=0)
