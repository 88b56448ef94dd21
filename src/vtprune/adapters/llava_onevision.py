"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): anyres_max images and pooled video frames.

What differs from LLaVA-NeXT (whose adapter this one extends):

* Images (anyres_max_N): base image (S x S tokens, S = image_size / patch_size; SigLIP has no [CLS] token, the
  "full" feature strategy keeps every patch), then the anyres tile grid, unpadded as in LLaVA-NeXT, and, when it
  still holds more than about N base images' worth of tokens (ratio = sqrt(rows*cols / (N*S*S)) > 1.1), resized
  bilinearly to (rows // ratio, cols // ratio); one `image_newline` token after each row. Images of a sample with
  several images (`batch_num_images` > 1) are not tiled: S x S tokens and one newline. The newline tokens are
  never pruned and never on the positional axis (left out of the layout).
* Videos: each frame's S x S features are pooled 2x2 (bilinear) to ceil(S/2) x ceil(S/2) tokens; a video is its
  frames one after the other and one `image_newline` token at the end (left out of the layout). One segment per
  frame.
* Padding debiasing does not apply (reported, never an error): the tile padding left after unpadding is resized
  away by the anyres_max interpolation for large images and the base image's geometry is the processor's; vtprune
  does not model them for this family.
* Grids come from `image_sizes` (and `batch_num_images`), or, inside `generate()` (which encodes the images
  first), from the encoded features' newline rows (the model's own `image_newline` vector).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import ModelAdapter, VisualLayout, VisualSegment
from .llava import _rotary_fn_for
from .llava_next import LlavaNextAdapter


class LlavaOnevisionAdapter(LlavaNextAdapter):
    model_classes = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    family = "LLaVA-OneVision"
    pads_images = False
    no_padding_reason = (
        "LLaVA-OneVision's anyres_max tiles are resized after unpadding and its base image follows the processor's "
        "own geometry, which vtprune does not model for this family; the scores are left as they are"
    )
    vision_side_unsupported = (
        "its visual tokens are anyres tiles re-laid, unpadded and resized (images) or pooled (video frames) after "
        "the vision tower, so the tower's attention has no one-to-one map onto them"
    )
    vision_cls_index = None

    def __init__(self, model: nn.Module):
        ModelAdapter.__init__(self, model)  # not LlavaAdapter.__init__: its checks are LLaVA-1.5's
        config = self.base.config
        self._read_patch_grid(config)
        self.pooled = math.ceil(self.side / 2)
        self.pinpoints = [tuple(int(v) for v in p) for p in config.image_grid_pinpoints]
        aspect = str(getattr(config, "vision_aspect_ratio", "anyres_max_9"))
        if not aspect.startswith("anyres_max_"):
            raise ValueError(f"vision_aspect_ratio={aspect!r}: vtprune supports LLaVA-OneVision's anyres_max_N")
        self.max_patches = int(aspect[len("anyres_max_") :])
        self.tokens_per_image = self.side * self.side
        self.rotary_fn = _rotary_fn_for(self.base.language_model)

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of an image's tile tokens after unpadding and the anyres_max resize."""
        tiles = self.tile_layout(height, width)
        rows, cols = tiles["rows_u"], tiles["cols_u"]
        ratio = math.sqrt(rows * cols / (self.max_patches * self.side**2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
        return rows, cols

    def image_tokens(self, height: int, width: int) -> int:
        rows, cols = self.token_grid(height, width)
        return self.tokens_per_image + rows * (cols + 1)

    def _image_grids(self, inputs: dict, count: int) -> list[tuple[int, int] | None]:
        """(rows, cols) of every image's tile grid in order; None for an image that is not tiled."""
        sizes = inputs.get("image_sizes")
        if sizes is not None:
            sizes = torch.as_tensor(sizes)
            if sizes.dim() != 2 or sizes.shape[1] != 2:
                raise ValueError(
                    f"image_sizes must have shape (number of images, 2) [height, width]; got {tuple(sizes.shape)}"
                )
            per_sample = inputs.get("batch_num_images")
            tiled = (
                [True] * len(sizes)
                if per_sample is None
                else [int(n) == 1 for n in torch.as_tensor(per_sample).tolist() for _ in range(int(n))]
            )
            if len(tiled) != len(sizes):
                raise ValueError(f"batch_num_images counts {len(tiled)} images but image_sizes has {len(sizes)}")
            grids = []
            for (height, width), tile in zip(sizes.tolist(), tiled):
                if height <= 0 or width <= 0:
                    raise ValueError(f"image_sizes has a non-positive size {[height, width]}")
                grids.append(self.token_grid(int(height), int(width)) if tile else None)
            return grids
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
        features = getattr(encoded, "pooler_output", None)
        if features is not None:  # an untiled image: its base tokens and one newline
            return [
                None
                if feature.shape[0] == self.tokens_per_image + 1
                else self._encoded_tile_grid(feature, "LLaVA-OneVision")
                for feature in features
            ]
        raise ValueError(
            f"the prompt has {count} image tokens but no image_sizes was passed: LLaVA-OneVision's token count depends "
            "on each image's size; pass every output of the processor (model(**inputs)), image_sizes included."
        )

    def visual_layout(self, input_ids: torch.Tensor, inputs: dict | None = None) -> VisualLayout:
        """Images and videos in prompt order: per image a base segment and a tile segment (newlines left out), per
        video one segment per pooled frame (the closing newline left out)."""
        inputs = inputs or {}
        is_image = input_ids == self.image_token_id
        is_video = input_ids == self.video_token_id
        visual = is_image | is_video
        image_total = int(is_image.sum())
        grids = self._image_grids(inputs, image_total) if image_total else []
        expected = sum(self.tokens_per_image + (1 if g is None else g[0] * (g[1] + 1)) for g in grids)
        if expected != image_total:
            raise ValueError(
                f"image_sizes describes {len(grids)} image(s) with {expected} tokens (base {self.side}x{self.side}, "
                f"anyres_max tiles and newlines) but the prompt holds {image_total} image tokens (id "
                f"{self.image_token_id}): pass the image_sizes (and batch_num_images) the processor returned with "
                "these input_ids, as (height, width) of the original images."
            )
        order = torch.argsort((~visual).to(torch.int8), dim=1, stable=True)
        frame_tokens = self.pooled * self.pooled
        positions, segments = [], []
        image_index = video_index = 0
        for b, count in enumerate(visual.sum(dim=1).tolist()):
            run = order[b, :count]
            kinds = is_video[b, run].tolist()
            gaps = (run[1:] - run[:-1] != 1).tolist()
            keep = torch.ones(count, dtype=torch.bool)
            sample_segments, used, offset, part = [], 0, 0, 0
            while used < count:
                if kinds[used]:  # a video: one contiguous run of video tokens
                    end = used + 1
                    while end < count and kinds[end] and not gaps[end - 1]:
                        end += 1
                    frames, rest = divmod(end - used - 1, frame_tokens)
                    if rest or frames == 0:
                        raise ValueError(
                            f"sample {b}: a run of {end - used} video tokens is not F frames x {frame_tokens} pooled "
                            "tokens + 1 newline: build the prompt with the model's processor."
                        )
                    for frame in range(frames):
                        sample_segments.append(
                            VisualSegment(
                                offset + frame * frame_tokens,
                                frame_tokens,
                                (self.pooled, self.pooled),
                                video_index,
                                kind="frame",
                                frame=frame,
                                part=part,
                            )
                        )
                    keep[end - 1] = False
                    offset += frames * frame_tokens
                    used, video_index = end, video_index + 1
                else:
                    start = used
                    if image_index >= len(grids):
                        raise ValueError(f"sample {b} has more image tokens than image_sizes describes")
                    grid = grids[image_index]
                    base_len = self.tokens_per_image
                    sample_segments.append(
                        VisualSegment(offset, base_len, self.grid, image_index, kind="base", part=part)
                    )
                    if grid is None:
                        keep[used + base_len] = False
                        used, offset = used + base_len + 1, offset + base_len
                    else:
                        rows, cols = grid
                        keep[used + base_len + torch.arange(1, rows + 1) * (cols + 1) - 1] = False
                        sample_segments.append(
                            VisualSegment(
                                offset + base_len, rows * cols, (rows, cols), image_index, kind="tiles", part=part
                            )
                        )
                        used, offset = used + base_len + rows * (cols + 1), offset + base_len + rows * cols
                    if used > count or any(kinds[start:used]):
                        raise ValueError(
                            f"sample {b}: image {image_index}'s tokens run into a video or past the prompt"
                        )
                    image_index += 1
                part += 1
            positions.append(run[keep.to(run.device)])
            segments.append(sample_segments)
        return VisualLayout(positions=positions, segments=segments)

    def image_geometry(self, processor):
        raise ValueError(f"{self.family}: {self.no_padding_reason}")

    def padding_fractions(self, layout: VisualLayout, image_sizes, processor) -> list[torch.Tensor]:
        return [torch.zeros(n) for n in layout.num_visual]
