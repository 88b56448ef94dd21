"""vtprune inside vLLM: a general plugin (entry point group `vllm.general_plugins`) that registers LLaVA-1.5 with
vtprune's before-the-language-model pruning as the architecture `VtpruneLlavaForConditionalGeneration`.

    vllm serve DIR --hf-overrides '{"architectures": ["VtpruneLlavaForConditionalGeneration"],
                                    "vtprune": {"method": "fastervlm", "keep": 36, "debias_padding": true}}'

`python -m vtprune.vllm.export MODEL DIR` writes a LLaVA in the layout vLLM loads. Importing this package does not
import vLLM; `register` does (vLLM calls it in every process it starts).
"""

from __future__ import annotations

ARCHITECTURE = "VtpruneLlavaForConditionalGeneration"


def register() -> None:
    """vLLM's plugin hook: register the pruned LLaVA (lazily, by module path)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "vtprune.vllm.llava:VtpruneLlavaForConditionalGeneration")


__all__ = ["ARCHITECTURE", "register"]
