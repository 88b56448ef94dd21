"""Tiny random-weight LLaVA models and a real LlavaProcessor, built offline in fixtures."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image

IMAGE_PX = 84  # 6x6 grid of 14-px patches: 36 visual tokens per image
WORDS = "what is the colour shape of a an in at top left right bottom red green blue circle square yes no".split()


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<pad>", "<s>", "</s>", "<image>"])
    tokenizer.train_from_iterator([" ".join(WORDS)] * 4 + ["USER: ASSISTANT: ? ."], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.padding_side = "left"
    return fast


def build_processor(do_pad: bool = True):
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    image_processor = LlavaImageProcessorPil(
        do_pad=do_pad,
        size={"shortest_edge": IMAGE_PX},
        crop_size={"height": IMAGE_PX, "width": IMAGE_PX},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def build_model(processor, attn: str = "sdpa", layers: int = 4, seed: int = 0, vision_layers: int = 2):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        image_size=IMAGE_PX, patch_size=14, hidden_size=32, intermediate_size=64,
        num_hidden_layers=vision_layers, num_attention_heads=4, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    # random init gives near-uniform attention; sharpen q/k so scores and selections are distinctive
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model.eval()


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


@pytest.fixture(scope="session")
def processor():
    return build_processor()


@pytest.fixture(scope="session")
def model(processor):
    return build_model(processor, attn="sdpa")


@pytest.fixture(scope="session")
def eager_model(processor):
    return build_model(processor, attn="eager")


def prompt(text: str = "what is the colour of the circle ?") -> str:
    return f"USER: <image>\n{text} ASSISTANT:"


def inputs_for(processor, images, texts):
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def _cache_kwarg_name() -> str:
    """The forward's KV-cache keyword: `cache` since transformers 5.24, `past_key_values` before."""
    import inspect

    from transformers import LlavaModel

    return "cache" if "cache" in inspect.signature(LlavaModel.forward).parameters else "past_key_values"


CACHE_KWARG = _cache_kwarg_name()
