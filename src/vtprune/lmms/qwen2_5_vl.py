"""`vtprune_qwen2_5_vl`: lmms-eval's `qwen2_5_vl` wrappers with a vtprune press. vtprune has no Qwen2.5-VL
adapter yet: with a method other than none the model is refused, before its weights load, with a one-line
error; the name works as soon as an adapter for `Qwen2_5_VLForConditionalGeneration` is registered."""

from __future__ import annotations

from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL as _Qwen2_5_VLChat
from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL as _Qwen2_5_VLSimple

from .base import PressMixin


class Qwen2_5_VL(PressMixin, _Qwen2_5_VLSimple):
    plugin_name = "vtprune_qwen2_5_vl"
    processor_attribute = "processor"


class Qwen2_5_VLChat(PressMixin, _Qwen2_5_VLChat):
    plugin_name = "vtprune_qwen2_5_vl"
    processor_attribute = "processor"


__all__ = ["Qwen2_5_VL", "Qwen2_5_VLChat"]
