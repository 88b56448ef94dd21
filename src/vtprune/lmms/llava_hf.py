"""`vtprune_llava_hf`: lmms-eval's `llava_hf` wrappers (simple and chat) with a vtprune press.

Defaults differ from `llava_hf` in two places: pad_to_square=True for LLaVA-1.5 (the original model's
preprocessing; the llava-hf processor may center-crop instead), and device_map defaults to `device`
(lmms-eval 0.7.3 passes device_map="" to from_pretrained in a single process, which transformers 5
refuses; with several processes, e.g. `accelerate launch`, llava_hf picks cuda:RANK itself).
"""

from __future__ import annotations

import os

from lmms_eval.models.chat.llava_hf import LlavaHf as _LlavaHfChat
from lmms_eval.models.simple.llava_hf import LlavaHf as _LlavaHfSimple

from .base import PressMixin


class _DeviceMap:
    def _wrapper_arguments(self, kwargs: dict) -> dict:
        kwargs = super()._wrapper_arguments(kwargs)
        single = int(os.environ.get("WORLD_SIZE", "1")) == 1  # several processes: llava_hf sets cuda:RANK itself
        if single and not kwargs.get("device_map"):
            kwargs["device_map"] = str(kwargs.get("device", "cuda"))
        return kwargs


class LlavaHf(_DeviceMap, PressMixin, _LlavaHfSimple):
    plugin_name = "vtprune_llava_hf"
    processor_attribute = "_image_processor"


class LlavaHfChat(_DeviceMap, PressMixin, _LlavaHfChat):
    plugin_name = "vtprune_llava_hf"
    processor_attribute = "_image_processor"


__all__ = ["LlavaHf", "LlavaHfChat"]
