"""Video-LLaVA (`VideoLlavaForConditionalGeneration`): images and videos, each through its own CLIP tower.

* Images: `image_token_id`, one fixed (S, S) grid per image (the [CLS] token cropped, as LLaVA-1.5).
* Videos: `video_token_id`, F frames of S*S + 1 tokens each: the video tower's [CLS] token stays in front of each
  frame's patches (transformers crops it only for images). The frame [CLS] tokens are not on the patch grid:
  like LLaVA-NeXT's newlines they are left out of the layout (never pruned, never ranked); each frame's S*S
  patches are one "frame" segment, so budgets count patches (the paper's 8 frames x 256 tokens).
* Positional debiasing of a video runs along the whole visual sequence of the video by default
  (`Debias(video_axis="video")`), or within each frame (`video_axis="frame"`).
* Padding: the image processor resizes and centre-crops (no padding; geometry from the processor like
  LLaVA-1.5's); video frames are cropped too: their padded share is 0.
* Vision-side methods are refused (two towers; the frame [CLS] attention is not mapped onto the layout yet).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ModelAdapter, VisualLayout, VisualSegment
from .llava import LlavaAdapter, _rotary_fn_for


class VideoLlavaAdapter(LlavaAdapter):
    model_classes = ("VideoLlavaForConditionalGeneration", "VideoLlavaModel")
    family = "Video-LLaVA"
    vision_side_unsupported = (
        "its images and video frames go through two towers and the frames keep their [CLS] tokens, which vtprune "
        "does not map onto the layout for vision-side scores yet"
    )

    def __init__(self, model: nn.Module):
        ModelAdapter.__init__(self, model)  # not LlavaAdapter.__init__: its checks are LLaVA-1.5's
        config = self.base.config
        self._read_patch_grid(config)
        self.tokens_per_image = self.side * self.side
        self.tokens_per_frame = self.side * self.side + 1
        if config.vision_feature_select_strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy={config.vision_feature_select_strategy!r}: vtprune supports 'default'"
            )
        self.rotary_fn = _rotary_fn_for(self.base.language_model)

    @property
    def vision_tower(self) -> nn.Module:
        return self.base.image_tower

    @property
    def vision_layers(self) -> nn.ModuleList:
        raise ValueError(f"Video-LLaVA: {self.vision_side_unsupported}")

    def visual_layout(self, input_ids: torch.Tensor, inputs: dict | None = None) -> VisualLayout:
        inputs = inputs or {}
        is_image = input_ids == self.image_token_id
        is_video = input_ids == self.video_token_id
        counts = self.read(torch.stack([is_image.sum(1), is_video.sum(1)], dim=1))
        videos = inputs.get("pixel_values_videos")
        frames = int(videos.shape[1]) if isinstance(videos, torch.Tensor) and videos.dim() == 5 else None
        order = torch.argsort((~(is_image | is_video)).to(torch.int8), dim=1, stable=True)
        positions, segments = [], []
        image_index = video_index = 0
        for b, (images, video_tokens) in enumerate(counts):
            if images % self.tokens_per_image:
                raise ValueError(
                    f"sample {b} has {images} image tokens, not a multiple of {self.tokens_per_image} per image: build "
                    "the prompt with the model's processor"
                )
            if video_tokens % self.tokens_per_frame:
                raise ValueError(
                    f"sample {b} has {video_tokens} video tokens, not a multiple of {self.tokens_per_frame} per frame "
                    f"({self.grid[0]}x{self.grid[1]} patches + the frame's [CLS] token): build the prompt with the "
                    "model's processor"
                )
            total = images + video_tokens
            run = order[b, :total]
            kinds = is_video[b, run].tolist()
            keep = torch.ones(total, dtype=torch.bool)
            sample_segments, used, offset, part = [], 0, 0, 0
            while used < total:
                if not kinds[used]:
                    sample_segments.append(
                        VisualSegment(offset, self.tokens_per_image, self.grid, image_index, part=part)
                    )
                    used += self.tokens_per_image
                    offset += self.tokens_per_image
                    image_index += 1
                else:
                    count = 0
                    while used + count < total and kinds[used + count]:
                        count += 1
                    per_video = self.tokens_per_frame * frames if frames else count
                    if frames and count % per_video:
                        raise ValueError(
                            f"sample {b}: {count} video tokens in a row, but pixel_values_videos has {frames} frames "
                            f"of {self.tokens_per_frame} tokens ({per_video} per video): more frames than tokens (or "
                            "fewer); build the prompt with the model's processor from the same videos"
                        )
                    for _ in range(count // per_video):
                        for frame in range(per_video // self.tokens_per_frame):
                            keep[used] = False  # the frame's [CLS] token
                            sample_segments.append(
                                VisualSegment(
                                    offset,
                                    self.tokens_per_image,
                                    self.grid,
                                    video_index,
                                    kind="frame",
                                    frame=frame,
                                    part=part,
                                )
                            )
                            used += self.tokens_per_frame
                            offset += self.tokens_per_image
                        video_index += 1
                        part += 1
                    continue
                part += 1
            positions.append(run[keep.to(run.device)])
            segments.append(sample_segments)
        return VisualLayout(positions=positions, segments=segments)

    def _image_geometry(self, image_processor):
        """The images' geometry, or False for the checkpoints' own `VideoLlavaImageProcessor` (a numpy processor
        the geometry reader does not parse) when it resizes the shortest edge to at least the crop and centre-crops
        without padding: no patch is padding."""
        if type(image_processor).__name__ == "VideoLlavaImageProcessor" and not getattr(
            image_processor, "do_pad", False
        ):
            size = getattr(image_processor, "size", None) or {}
            crop = getattr(image_processor, "crop_size", None) or {}
            shortest = size.get("shortest_edge")
            if (
                image_processor.do_resize
                and image_processor.do_center_crop
                and shortest is not None
                and shortest >= max(crop.get("height", 0), crop.get("width", 0))
            ):
                return False
        return self.image_geometry(image_processor)

    def padding_fractions(self, layout: VisualLayout, image_sizes, processor) -> list[torch.Tensor]:
        from .geometry import padded_fraction

        geometry = None
        out = []
        for sample_segments in layout.segments:
            parts = []
            for segment in sample_segments:
                if segment.kind == "frame":
                    parts.append(torch.zeros(segment.length))
                    continue
                if geometry is None:
                    geometry = self._image_geometry(getattr(processor, "image_processor", processor))
                if geometry is False:  # resize + centre crop: every patch is image
                    parts.append(torch.zeros(segment.length))
                    continue
                parts.append(padded_fraction(geometry, tuple(image_sizes[segment.image_index])).reshape(-1))
            out.append(torch.cat(parts) if parts else torch.zeros(0))
        return out
