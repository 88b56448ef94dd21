"""`vtprune_qwen2_5_vl`: lmms-eval's `qwen2_5_vl` wrappers with a vtprune press (vtprune's Qwen2.5-VL adapter).
Image requests are pruned; requests with videos are refused while pruning (run them with method=none)."""

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
