"""Save a tiny random LLaVA-NeXT and its processor for the vLLM tests: `python tiny_llava_next.py DIR` (its own
interpreter: it imports tests/families.py, whose conftest module is tests/'s, not tests_vllm's).

The processor and the vision side are tests/families.py's (56-px tiles of 4x4 tokens, pinpoints up to 112x168);
the language model is wider than families' (head_dim 64, where families' has 16): vLLM's CPU attention kernels
support only some head sizes, and 16 is not one of them."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"


def build(directory: str) -> None:
    sys.path.insert(0, str(TESTS))  # before this directory: `conftest` must be tests/conftest.py
    from families import NEXT_PINPOINTS, NEXT_TILE, build_llava_next_processor, sharpen
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    processor = build_llava_next_processor()
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(image_size=NEXT_TILE, patch_size=14, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaNextConfig(vision_config=vision, text_config=text,
                             image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_grid_pinpoints=NEXT_PINPOINTS)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config)
    with torch.no_grad():  # a distinctive newline vector (random init leaves it at zero)
        model.model.image_newline.normal_()
    sharpen(model.model.language_model.layers)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


if __name__ == "__main__":
    build(sys.argv[1])
