"""`vtprune_llava_hf`: lmms-eval's `llava_hf` wrappers (simple and chat) with a vtprune press.

Defaults differ from `llava_hf` in two places: pad_to_square=True for LLaVA-1.5 (the original model's
preprocessing; the llava-hf processor may center-crop instead), and device_map defaults to this process's
device (`process_device`): lmms-eval 0.7.3 passes device_map="" to from_pretrained in a single process, which
transformers 5 refuses, and with several processes (`accelerate launch`) llava_hf would pick cuda:RANK itself
and refuse CPU processes.
"""

from __future__ import annotations

import os

from lmms_eval.models.chat.llava_hf import LlavaHf as _LlavaHfChat
from lmms_eval.models.simple.llava_hf import LlavaHf as _LlavaHfSimple

from .base import PressMixin


def process_device(device: str | None) -> str:
    """This process's device: with several processes (`accelerate launch`, `torchrun`: WORLD_SIZE > 1) a bare
    'cuda' (lmms-eval's default) becomes cuda:LOCAL_RANK, one replica per GPU; 'cpu' or an explicit 'cuda:N'
    stay as given."""
    device = str(device or "cuda")
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


class _DeviceMap:
    """llava_hf places the model with `device_map`: its default "" fails in transformers 5 in one process, and
    with several processes it picks cuda:RANK itself and refuses a CPU run. Give it this process's device: every
    process then holds one whole replica, and lmms-eval's evaluator splits the questions by RANK and gathers
    the answers."""

    def _wrapper_arguments(self, kwargs: dict) -> dict:
        kwargs = super()._wrapper_arguments(kwargs)
        if not kwargs.get("device_map"):
            kwargs["device"] = process_device(kwargs.get("device"))
            kwargs["device_map"] = kwargs["device"]
        return kwargs


class LlavaHf(_DeviceMap, PressMixin, _LlavaHfSimple):
    plugin_name = "vtprune_llava_hf"
    processor_attribute = "_image_processor"
    model_types = ("llava", "llava_next", "llava_onevision")


class LlavaHfChat(_DeviceMap, PressMixin, _LlavaHfChat):
    plugin_name = "vtprune_llava_hf"
    processor_attribute = "_image_processor"
    model_types = ("llava", "llava_next", "llava_onevision")


__all__ = ["LlavaHf", "LlavaHfChat", "process_device"]
