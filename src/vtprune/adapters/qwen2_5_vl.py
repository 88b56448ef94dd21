"""Qwen2-VL and Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`, `Qwen2VLForConditionalGeneration`).

What differs from LLaVA-1.5:

* Dynamic resolution: each image is resized (aspect ratio kept, no padding) to a multiple of 28 px and cut into
  14-px patches; the vision tower merges 2x2 patches, so an image of grid (t, h, w) patches becomes t*h*w/4
  language-model tokens on an (h/2, w/2) grid. The grid of every image comes from `image_grid_thw` (videos:
  `video_grid_thw`, one temporal group of 2 frames per t), never from the token count alone.
* Images and videos: `image_token_id` and `video_token_id` placeholders, each run between
  `<|vision_start|>` / `<|vision_end|>`. A video is split into one segment per temporal group (a "frame"),
  each on its own (h/2, w/2) grid, in the order the model feeds them (t, then rows, then columns).
* 3-D mRoPE: positions are (t, h, w) per token (`get_rope_index`); the rotary embedding already folds the three
  axes into one (cos, sin) table per token, so the engine's gather of cos/sin keeps each kept token's own 3-D
  position, and decoding continues from the model's `rope_deltas` (layer 0 is never cut by an in-decoder
  stage, so the model's own decode positions are the unpruned ones, as FastV does). There is no compact
  renumbering of 3-D positions: `positions="compact"` keeps the original ones (recorded in the stage notes).
* No pad-to-square: padding debiasing does not apply (it reports so, it does not fail).
* The vision tower has no [CLS] token and reorders patches into attention windows: vision-side methods
  (VisionZip, FasterVLM, iLLaVA's vision stages) are refused with the list of methods that work.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ModelAdapter, VisualLayout, VisualSegment
from .llava import _rotary_fn_for


class Qwen2_5_VLAdapter(ModelAdapter):
    model_classes: tuple[str, ...] = (
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2_5_VLModel",
        "Qwen2VLForConditionalGeneration",
        "Qwen2VLModel",
    )
    family = "Qwen2.5-VL"

    pads_images = False
    no_padding_reason = (
        "Qwen-VL models resize each image to its own dynamic-resolution grid (aspect ratio kept), so no visual "
        "token is padding; the scores are left as they are"
    )
    compact_positions = False
    compact_note = (
        "Qwen-VL models give each token a 3-D mRoPE position (time, row, column) with no 1-D renumbering: kept "
        "tokens keep their own positions"
    )
    vision_side_unsupported = "its vision tower has no [CLS] token and runs on attention windows of merged patches"
    vision_cls_index = None

    def __init__(self, model: nn.Module):
        super().__init__(model)
        config = self.base.config
        self.image_token_id = int(config.image_token_id)
        self.video_token_id = int(config.video_token_id)
        self.merge = int(config.vision_config.spatial_merge_size)
        self.rotary_fn = _rotary_fn_for(self.base.language_model)

    # --- visual tokens -------------------------------------------------------------------------------
    def _grids(self, inputs: dict, key: str, kind: str, count: int) -> list[tuple[int, int, int]]:
        grid = inputs.get(key)
        if count == 0:
            return []
        if grid is None:
            raise ValueError(
                f"the prompt has {count} {kind} tokens but no {key} was passed: Qwen-VL models need the "
                f"{kind} grids the processor returns (pass every output of the processor, e.g. model(**inputs))."
            )
        grid = torch.as_tensor(grid)
        if grid.dim() != 2 or grid.shape[1] != 3:
            raise ValueError(f"{key} must have shape (number of {kind}s, 3) [t, h, w]; got {tuple(grid.shape)}")
        rows = [tuple(int(v) for v in row) for row in grid.tolist()]
        for t, h, w in rows:
            if min(t, h, w) <= 0 or h % self.merge or w % self.merge:
                raise ValueError(
                    f"{key} row {[t, h, w]} is not a grid of this model: h and w must be positive multiples of the "
                    f"spatial merge size {self.merge}"
                )
        return rows

    def visual_layout(self, input_ids: torch.Tensor, inputs: dict | None = None) -> VisualLayout:
        """Images and videos in prompt order; each video split into its temporal groups ("frames"). The grids come
        from `image_grid_thw` / `video_grid_thw`, or, when generate() has already encoded the images (it then
        drops the grids and passes the 3-D positions it computed from them), from those positions."""
        inputs = inputs or {}
        is_image = input_ids == self.image_token_id
        is_video = input_ids == self.video_token_id
        visual = is_image | is_video
        counts = torch.stack([is_image.sum(), is_video.sum()]).tolist()
        positions3 = inputs.get("position_ids")
        if positions3 is not None and (positions3.dim() != 3 or positions3.shape[0] not in (3, 4)):
            positions3 = None
        have_grid = {
            "image": inputs.get("image_grid_thw") is not None,
            "video": inputs.get("video_grid_thw") is not None,
        }
        queues: dict[str, list | None] = {}
        for kind, total, key in (("image", counts[0], "image_grid_thw"), ("video", counts[1], "video_grid_thw")):
            if total and not have_grid[kind] and positions3 is not None:
                queues[kind] = None  # derived from the positions, run by run
                continue
            queues[kind] = self._grids(inputs, key, kind, total)
            expected = sum(t * h * w // (self.merge * self.merge) for t, h, w in queues[kind])
            if expected != total:
                raise ValueError(
                    f"{key} describes {len(queues[kind])} {kind}(s) with {expected} tokens after the "
                    f"{self.merge}x{self.merge} merge, but the prompt holds {total} {kind} tokens: pass the grid "
                    "tensor the processor returned with these input_ids."
                )
        if positions3 is not None:
            positions3 = positions3[-3:]
        sizes = {kind: self._encoded_sizes(inputs, kind) for kind in ("image", "video")}
        next_index = {"image": 0, "video": 0}
        positions, segments = [], []
        order = torch.argsort((~visual).to(torch.int8), dim=1, stable=True)
        sample_counts = visual.sum(dim=1).tolist()
        for b, count in enumerate(sample_counts):
            sample_positions = order[b, :count]
            sample_kinds = is_video[b, sample_positions].tolist()
            gaps = (sample_positions[1:] - sample_positions[:-1] != 1).tolist() if count else []
            sample_segments: list[VisualSegment] = []
            offset, part = 0, 0
            while offset < count:
                kind = "video" if sample_kinds[offset] else "image"
                index = next_index[kind]
                next_index[kind] += 1
                if queues[kind] is None:
                    # one contiguous run per image or video, or, where the encoded features say how many tokens
                    # each has (Qwen3-VL puts a timestamp between a video's frames), runs until that count
                    size = sizes[kind][index] if sizes[kind] is not None and index < len(sizes[kind]) else None
                    frames, end = [], offset
                    while True:
                        run_end = end + 1
                        while (
                            run_end < count and not gaps[run_end - 1] and sample_kinds[run_end] == sample_kinds[offset]
                        ):
                            run_end += 1
                        frames += self._frames_from_positions(positions3[:, b, sample_positions[end:run_end]], kind)
                        end = run_end
                        if (
                            size is None
                            or end - offset >= size
                            or end >= count
                            or sample_kinds[end] != sample_kinds[offset]
                        ):
                            break
                else:
                    if index >= len(queues[kind]):
                        raise ValueError(f"sample {b} has more {kind} tokens than the {kind} grids describe")
                    t, h, w = queues[kind][index]
                    rows, cols = h // self.merge, w // self.merge
                    frames = [(rows, cols)] * t if kind == "video" else [(rows * t, cols)]
                length = sum(r * c for r, c in frames)
                if offset + length > count or len(set(sample_kinds[offset : offset + length])) != 1:
                    raise ValueError(
                        f"sample {b}: the {kind} tokens do not match {kind} {index}'s grid ({length} tokens): pass the "
                        "grid tensor the processor returned with these input_ids."
                    )
                start = offset
                for frame, (rows, cols) in enumerate(frames):
                    sample_segments.append(
                        VisualSegment(
                            offset=start,
                            length=rows * cols,
                            grid=(rows, cols),
                            image_index=index,
                            kind="frame" if kind == "video" else "image",
                            frame=frame,
                            part=part,
                        )
                    )
                    start += rows * cols
                offset += length
                part += 1
            positions.append(sample_positions)
            segments.append(sample_segments)
        return VisualLayout(positions=positions, segments=segments)

    @staticmethod
    def _encoded_sizes(inputs: dict, kind: str) -> list[int] | None:
        """Tokens of each image or video, from the features generate() encoded before its first forward (one
        tensor per image / video in `mm_encoder_outputs[kind].pooler_output`), or None."""
        encoded = inputs.get("mm_encoder_outputs")
        output = encoded.get(kind) if isinstance(encoded, dict) else None
        pooled = getattr(output, "pooler_output", None)
        if not isinstance(pooled, (list, tuple)):
            return None
        return [int(t.shape[0]) for t in pooled]

    @staticmethod
    def _frames_from_positions(run: torch.Tensor, kind: str) -> list[tuple[int, int]]:
        """(rows, cols) of each temporal group of one image or video, from its tokens' (3, n) t/h/w positions."""
        t, h, w = run.tolist()
        groups: list[list[int]] = []
        for i, value in enumerate(t):
            if not groups or value != t[groups[-1][0]]:
                groups.append([])
            groups[-1].append(i)
        if kind == "image":
            groups = [list(range(len(t)))]
        frames = []
        for members in groups:
            rows = max(h[i] for i in members) - min(h[i] for i in members) + 1
            cols = max(w[i] for i in members) - min(w[i] for i in members) + 1
            frames.append((rows, cols) if rows * cols == len(members) else (1, len(members)))
        return frames

    def image_geometry(self, processor):
        raise ValueError(f"{self.family}: {self.no_padding_reason}")

    def padding_fractions(self, layout: VisualLayout, image_sizes, processor) -> list[torch.Tensor]:
        return [torch.zeros(n) for n in layout.num_visual]
