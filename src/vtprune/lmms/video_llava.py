"""`vtprune_video_llava`: lmms-eval's `video_llava` wrapper with a vtprune press. vtprune has no Video-LLaVA
adapter yet: with a method other than none the model is refused, before its weights load, with a one-line
error; the name works as soon as an adapter for `VideoLlavaForConditionalGeneration` is registered (the
press then also needs to prune video tokens: requests with videos are refused until then)."""

from __future__ import annotations

from lmms_eval.models.simple.video_llava import VideoLLaVA as _VideoLLaVA

from .base import PressMixin


class VideoLLaVA(PressMixin, _VideoLLaVA):
    plugin_name = "vtprune_video_llava"
    processor_attribute = "_processor"


__all__ = ["VideoLLaVA"]
