"""vtprune inside vLLM: a general plugin (entry point group `vllm.general_plugins`) that registers LLaVA-1.5 and
LLaVA-NeXT with vtprune's before-the-language-model pruning as the architectures
`VtpruneLlavaForConditionalGeneration` and `VtpruneLlavaNextForConditionalGeneration`.

    vllm serve DIR --hf-overrides '{"architectures": ["VtpruneLlavaForConditionalGeneration"],
                                    "vtprune": {"method": "fastervlm", "keep": 36, "debias_padding": true}}'

Per request: `mm_processor_kwargs={"vtprune": {"keep": 0.5}}` overrides the model's options for that request.
`python -m vtprune.vllm.export MODEL DIR` writes a LLaVA in the layout vLLM loads. Importing this package does not
import vLLM; `register` does (vLLM calls it in every process it starts).
"""

from __future__ import annotations

ARCHITECTURE = "VtpruneLlavaForConditionalGeneration"
NEXT_ARCHITECTURE = "VtpruneLlavaNextForConditionalGeneration"
#: the architectures the plugin registers, and where vLLM finds them (imported lazily)
ARCHITECTURES = {
    ARCHITECTURE: "vtprune.vllm.llava:VtpruneLlavaForConditionalGeneration",
    NEXT_ARCHITECTURE: "vtprune.vllm.llava_next:VtpruneLlavaNextForConditionalGeneration",
}


def register() -> None:
    """vLLM's plugin hook: register the pruned LLaVA and LLaVA-NeXT (lazily, by module path)."""
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for architecture, location in ARCHITECTURES.items():
        if architecture not in supported:
            ModelRegistry.register_model(architecture, location)


__all__ = ["ARCHITECTURE", "ARCHITECTURES", "NEXT_ARCHITECTURE", "register"]
