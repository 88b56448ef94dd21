"""`vtprune_video_llava`: lmms-eval's `video_llava` wrapper with a vtprune press (vtprune's Video-LLaVA adapter):
image and video requests are pruned (a video's 8 frames x 256 patches are the visual tokens; each frame's [CLS]
token is never pruned).

Three things differ from lmms-eval's own wrapper:

* it reads videos: lmms-eval 0.7.3's wrapper calls `read_video(path, 8)`, which that version's `read_video`
  (number of frames keyword-only) refuses with a TypeError on every video; here the 8 frames are passed by name;
* `--device cpu` in one process keeps the model on the CPU (the wrapper would move it to cuda:0);
* where torchvision is missing (the README's CPU install leaves it out, and transformers' video processors need
  it), the processor handles videos frame by frame with Video-LLaVA's image processor (`FrameVideoProcessor`:
  the same resize, centre crop and normalisation in PIL, so pixel values can differ from torchvision's in the
  last bits). With torchvision installed the wrapper's own processor runs unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager

import lmms_eval.models.simple.video_llava as _wrapper_module
from lmms_eval.models.simple.video_llava import VideoLLaVA as _VideoLLaVA

from .base import PressMixin


class FrameVideoProcessor:
    """A Video-LLaVA processor whose video slot is empty (built without torchvision), taught videos: each video
    (an array (F, H, W, 3), or a list of frames) goes frame by frame through the image processor, giving
    `pixel_values_videos` (B, F, 3, S, S), and each `<video>` of the text becomes F x (patches + 1) video tokens,
    as VideoLlavaProcessor does. Everything else is the wrapped processor's."""

    def __init__(self, processor):
        self.processor = processor

    def __getattr__(self, name):
        return getattr(self.processor, name)

    def __call__(self, text=None, images=None, videos=None, return_tensors="pt", **kwargs):
        if videos is None:
            return self.processor(text=text, images=images, return_tensors=return_tensors, **kwargs)
        if images is not None:
            raise ValueError(
                "FrameVideoProcessor (Video-LLaVA without torchvision) takes videos or images, not both "
                "in one call: install torchvision for mixed prompts"
            )
        import numpy as np
        import torch

        clips = [videos] if _is_one_video(videos) else list(videos)
        processor = self.processor
        pixels = []
        for clip in clips:
            frames = list(np.asarray(clip)) if not isinstance(clip, (list, tuple)) else list(clip)
            out = processor.image_processor(frames, return_tensors="pt")
            pixels.append(out.get("pixel_values", out.get("pixel_values_images")))
        if len({tuple(p.shape) for p in pixels}) != 1:
            raise ValueError("the videos of one call have different frame counts or sizes: process them one by one")
        height, width = pixels[0].shape[-2:]
        per_frame = (height // processor.patch_size) * (
            width // processor.patch_size
        ) + processor.num_additional_image_tokens
        texts = [text] if isinstance(text, str) else list(text)
        token = processor.video_token
        if sum(t.count(token) for t in texts) != len(pixels):
            raise ValueError(
                f"the text holds {sum(t.count(token) for t in texts)} {token} tokens for {len(pixels)} "
                "videos: give one per video"
            )
        expanded = [t.replace(token, token * (per_frame * pixels[0].shape[0])) for t in texts]
        encoded = processor.tokenizer(expanded, return_tensors=return_tensors, padding=len(expanded) > 1)
        return {**encoded, "pixel_values_videos": torch.stack(pixels)}


def _is_one_video(videos) -> bool:
    """One video: an array (F, H, W, C) or a list of frames (arrays or PIL images), not a list of videos."""
    import numpy as np

    if isinstance(videos, np.ndarray) or hasattr(videos, "dim"):
        return videos.ndim == 4
    return bool(videos) and not isinstance(videos[0], (list, tuple)) and np.asarray(videos[0]).ndim == 3


@contextmanager
def _processor_without_torchvision():
    """While the wrapper loads: VideoLlavaProcessor.from_pretrained builds the processor without its video slot
    where torchvision is missing (`vtprune.apps.loading.load_processor`) and then handles videos frame by frame."""
    real = _wrapper_module.VideoLlavaProcessor

    class Loader:
        @staticmethod
        def from_pretrained(path, **kwargs):
            from ..apps.loading import load_processor

            processor = load_processor(str(path))
            if getattr(processor, "video_processor", None) is None:
                return FrameVideoProcessor(processor)
            return processor

    _wrapper_module.VideoLlavaProcessor = Loader
    try:
        yield
    finally:
        _wrapper_module.VideoLlavaProcessor = real


@contextmanager
def _frames_by_name():
    """While the wrapper answers: its `read_video(path, num_frames)` call passes the frame count by name."""
    from lmms_eval.models.model_utils.load_video import read_video

    def read_frames(path, num_frames: int = 8):
        return read_video(path, num_frm=num_frames)

    original = _wrapper_module.read_video
    _wrapper_module.read_video = read_frames
    try:
        yield
    finally:
        _wrapper_module.read_video = original


class VideoLLaVA(PressMixin, _VideoLLaVA):
    plugin_name = "vtprune_video_llava"
    processor_attribute = "_processor"
    model_types = ("video_llava",)

    def __init__(self, **kwargs):
        with _processor_without_torchvision():
            super().__init__(**kwargs)

    def generate_until(self, requests):
        with _frames_by_name():
            return super().generate_until(requests)

    def _wrapper_arguments(self, kwargs: dict) -> dict:
        """`--device cpu` (one process): the wrapper keeps the model where it loaded it only with
        device_map="auto"; any other device_map sends it to cuda:0."""
        kwargs = super()._wrapper_arguments(kwargs)
        if str(kwargs.get("device", "")) == "cpu" and "device_map" not in kwargs:
            kwargs["device_map"] = "auto"
        return kwargs


__all__ = ["FrameVideoProcessor", "VideoLLaVA"]
