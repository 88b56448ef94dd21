"""`vtprune_video_llava`: lmms-eval's `video_llava` wrapper with a vtprune press (vtprune's Video-LLaVA
adapter). Image requests are pruned; requests with videos are refused while pruning until the plugin passes
video inputs through (vtprune's library prunes Video-LLaVA videos; lmms-eval's wrapper needs `av`, untested here)."""

from __future__ import annotations

from lmms_eval.models.simple.video_llava import VideoLLaVA as _VideoLLaVA

from .base import PressMixin


class VideoLLaVA(PressMixin, _VideoLLaVA):
    plugin_name = "vtprune_video_llava"
    processor_attribute = "_processor"
    model_types = ("video_llava",)


__all__ = ["VideoLLaVA"]
