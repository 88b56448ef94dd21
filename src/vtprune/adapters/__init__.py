"""Model-family adapters. `adapter_for(model)` picks the one for a loaded model."""

from __future__ import annotations

from torch import nn

from .base import ModelAdapter, VisualLayout, VisualSegment
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen3_vl import Qwen3VLAdapter
from .video_llava import VideoLlavaAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (
    LlavaAdapter,
    LlavaNextAdapter,
    LlavaOnevisionAdapter,
    VideoLlavaAdapter,
    Qwen2_5_VLAdapter,
    Qwen3VLAdapter,
)


def supported_model_classes() -> list[str]:
    return [name for adapter in ADAPTERS for name in adapter.model_classes]


#: model classes refused on purpose, with the reason
REFUSED: dict[str, str] = dict.fromkeys(
    ("Qwen3_5ForConditionalGeneration", "Qwen3_5Model", "Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeModel"),
    "Qwen3.5 mixes full-attention layers with Gated DeltaNet linear-attention layers (3 of every 4): those keep "
    "a fixed-size recurrent state and a short causal convolution over neighbouring tokens instead of "
    "per-token keys and values, and give no attention scores. vtprune's engine keeps a KV cache per token in "
    "every layer it cuts after, and the attention-score methods score at the layer before their cut, which "
    "is a linear-attention layer at the published depths; pruning inside this decoder is not supported (see "
    "the README)",
)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """Return the adapter for `model`, or raise naming the supported classes."""
    name = type(model).__name__
    for adapter in ADAPTERS:
        if name in adapter.model_classes:
            return adapter(model)
    if name in REFUSED:
        raise ValueError(
            f"vtprune does not support {name}: {REFUSED[name]}. Supported model classes: "
            f"{', '.join(supported_model_classes())}."
        )
    raise ValueError(
        f"vtprune does not support {name}. Supported model classes: {', '.join(supported_model_classes())}."
    )


__all__ = [
    "ModelAdapter",
    "VisualLayout",
    "VisualSegment",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "LlavaOnevisionAdapter",
    "Qwen2_5_VLAdapter",
    "Qwen3VLAdapter",
    "VideoLlavaAdapter",
    "adapter_for",
    "supported_model_classes",
]
