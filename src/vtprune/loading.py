"""Loading models and building prompts with transformers' normal code paths."""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

#: LLaVA-1.5's conversation format, used when a processor has no chat template
LLAVA15_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"


def load_model(
    spec: str,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
) -> tuple[nn.Module, object]:
    """Load (model, processor) from a local directory or hub id with `from_pretrained`.

    spec "testbed" loads the small model shipped with vtprune. Offline, a hub id fails with transformers'
    own error. dtype: "auto" picks float32 on CPU and bfloat16 on GPUs, or a torch dtype name.
    """
    if spec == "testbed":
        from .testbed.model import load_testbed

        model, processor = load_testbed()
        return model.to(device).eval(), processor
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch_dtype = _resolve_dtype(dtype, device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torchvision.*")
        processor = AutoProcessor.from_pretrained(spec)
    model = AutoModelForImageTextToText.from_pretrained(
        spec, dtype=torch_dtype, attn_implementation=attn_implementation
    )
    return model.to(device).eval(), processor


def _resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use auto, float32, float16 or bfloat16")
    return resolved


def build_prompt(processor, prompt: str) -> str:
    """The text for one image + one question, using the processor's chat template when it has one."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return LLAVA15_TEMPLATE.format(prompt=prompt)


def build_inputs(processor, images: Sequence, prompts: Sequence[str], device: str = "cpu") -> dict:
    """Processor outputs for a batch of (image, prompt) pairs, left-padded for generation."""
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"
    texts = [build_prompt(processor, p) for p in prompts]
    inputs = processor(images=list(images), text=texts, return_tensors="pt", padding=True)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
