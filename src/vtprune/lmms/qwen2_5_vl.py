"""`vtprune_qwen2_5_vl`: lmms-eval's `qwen2_5_vl` wrappers with a vtprune press (vtprune's Qwen2.5-VL adapter).
Image and video requests are pruned (a video's merged patches of every frame are its visual tokens). lmms-eval's
wrapper reads videos with qwen-vl-utils, which needs torchvision: video tasks run where torchvision is installed
(a CUDA machine), not on the README's CPU install."""

from __future__ import annotations

from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL as _Qwen2_5_VLChat
from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL as _Qwen2_5_VLSimple

from .base import PressMixin


class _DeviceMap:
    """qwen2_5_vl defaults to device_map="auto" and then moves inputs to "cuda", also with --device cpu: in one
    process, place the model on `device` unless a device_map is given (several processes: the wrapper picks
    cuda:LOCAL_RANK itself)."""

    def _wrapper_arguments(self, kwargs: dict) -> dict:
        kwargs = super()._wrapper_arguments(kwargs)
        if "device_map" not in kwargs and kwargs.get("device"):
            kwargs["device_map"] = str(kwargs["device"])
        return kwargs


class Qwen2_5_VL(_DeviceMap, PressMixin, _Qwen2_5_VLSimple):
    plugin_name = "vtprune_qwen2_5_vl"
    processor_attribute = "processor"
    model_types = ("qwen2_5_vl",)


class Qwen2_5_VLChat(_DeviceMap, PressMixin, _Qwen2_5_VLChat):
    plugin_name = "vtprune_qwen2_5_vl"
    processor_attribute = "processor"
    model_types = ("qwen2_5_vl",)


__all__ = ["Qwen2_5_VL", "Qwen2_5_VLChat"]
