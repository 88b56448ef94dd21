"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres images.

Each image becomes, in this order: the base image (the whole image squashed to one vision-tower tile, S x S
tokens, no padding) and the anyres tiles (the image resized with its aspect ratio kept to the best of
`image_grid_pinpoints`, centre-padded with black to it, cut into tiles; their S x S grids laid side by side
into one (rows x S) x (cols x S) grid), from which the model removes the rows (or columns) that are padding
at feature level ("unpadding"), then appends one `image_newline` token after each remaining row.

* Visual tokens (prunable, on the positional axis): the base grid and the unpadded tile grid. The newline tokens
  carry the image token id but are never pruned and never ranked: the adapter leaves them out of the layout, so
  the engine treats them like text.
* Segments: per image, one "base" segment (S, S) and one "tiles" segment (rows_u, cols_u).
* Padding geometry: the tiles' tokens left after unpadding can still be partly padding (the unpadding works on
  whole feature rows); their padded share of pixels comes from the processor's pinpoints and the original size.
  The base image has none.
* The grid of each image comes from `image_sizes` (a plain forward), or, inside `generate()` (which encodes the
  images first and drops `image_sizes`), from the encoded features: the newline rows are the model's own
  `image_newline` vector.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import ModelAdapter, VisualLayout, VisualSegment
from .llava import LlavaAdapter, _rotary_fn_for


class LlavaNextAdapter(LlavaAdapter):
    model_classes = ("LlavaNextForConditionalGeneration", "LlavaNextModel")
    family = "LLaVA-NeXT"
    sizes_in_inputs = True
    vision_side_unsupported = (
        "its visual tokens are anyres tiles re-laid into one grid and unpadded after the vision tower, so the "
        "tower's [CLS] attention has no one-to-one map onto them in vtprune yet"
    )

    def __init__(self, model: nn.Module):
        ModelAdapter.__init__(self, model)  # not LlavaAdapter.__init__: its checks are LLaVA-1.5's
        config = self.base.config
        self._read_patch_grid(config)
        self.pinpoints = [tuple(int(v) for v in p) for p in config.image_grid_pinpoints]
        if config.vision_feature_select_strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy={config.vision_feature_select_strategy!r} keeps the CLS token among "
                "the visual tokens, which has no place on the patch grid; vtprune supports 'default'."
            )
        self.tokens_per_image = self.side * self.side
        self.rotary_fn = _rotary_fn_for(self.base.language_model)

    # --- geometry --------------------------------------------------------------------------------------------
    def tile_layout(self, height: int, width: int) -> dict:
        """For an original image of (height, width) px: the best resolution, the tile grid before unpadding
        (rows, cols tokens), the rows/cols the model removes (top, left) and the grid left (rows_u, cols_u)."""
        from transformers.image_processing_utils import select_best_resolution

        best_h, best_w = select_best_resolution((height, width), [list(p) for p in self.pinpoints])
        rows, cols = best_h // self.image_size * self.side, best_w // self.image_size * self.side
        # the model's unpadding (modeling_llava_next.unpad_image), on the token grid
        top = left = 0
        rows_u, cols_u = rows, cols
        if width / height > cols / rows:
            kept = int(round(height * (cols / width), 7))
            top = (rows - kept) // 2
            rows_u = rows - 2 * top
        else:
            kept = int(round(width * (rows / height), 7))
            left = (cols - kept) // 2
            cols_u = cols - 2 * left
        return {
            "best": (best_h, best_w),
            "rows": rows,
            "cols": cols,
            "top": top,
            "left": left,
            "rows_u": rows_u,
            "cols_u": cols_u,
        }

    def image_tokens(self, height: int, width: int) -> int:
        tiles = self.tile_layout(height, width)
        return self.tokens_per_image + tiles["rows_u"] * (tiles["cols_u"] + 1)

    def tile_padding(self, height: int, width: int) -> torch.Tensor:
        """(rows_u, cols_u) padded share of the pixels of each tile token left after unpadding: the processor
        resizes the image to fit the best resolution (aspect kept, `get_patch_output_size`: the long side fills,
        the other rounds up) and pads it centred (the extra pixel at the bottom/right)."""
        tiles = self.tile_layout(height, width)
        best_h, best_w = tiles["best"]
        scale_w, scale_h = best_w / width, best_h / height
        if scale_w < scale_h:
            new_w, new_h = best_w, min(math.ceil(height * scale_w), best_h)
        else:
            new_h, new_w = best_h, min(math.ceil(width * scale_h), best_w)
        y0, x0 = (best_h - new_h) // 2, (best_w - new_w) // 2
        px = self.patch_size  # each token covers patch_size x patch_size pixels of the padded canvas

        def overlap(start, length, first, count):
            edges = torch.arange(first, first + count, dtype=torch.float64) * px
            inside = (
                torch.minimum(edges + px, torch.tensor(float(start + length)))
                - torch.maximum(edges, torch.tensor(float(start)))
            ).clamp(min=0)
            return inside / px

        rows = overlap(y0, new_h, tiles["top"], tiles["rows_u"])
        cols = overlap(x0, new_w, tiles["left"], tiles["cols_u"])
        return (1.0 - rows[:, None] * cols[None, :]).float()

    # --- visual tokens ---------------------------------------------------------------------------------------
    def _image_grids(self, inputs: dict, count: int) -> list[tuple[int, int]]:
        """(rows_u, cols_u) of every image of the batch, in order."""
        sizes = inputs.get("image_sizes")
        if sizes is not None:
            sizes = torch.as_tensor(sizes)
            if sizes.dim() != 2 or sizes.shape[1] != 2:
                raise ValueError(
                    f"image_sizes must have shape (number of images, 2) [height, width]; got {tuple(sizes.shape)}"
                )
            grids = []
            for height, width in sizes.tolist():
                if height <= 0 or width <= 0:
                    raise ValueError(f"image_sizes has a non-positive size {[height, width]}")
                tiles = self.tile_layout(int(height), int(width))
                grids.append((tiles["rows_u"], tiles["cols_u"]))
            return grids
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
        features = getattr(encoded, "pooler_output", None)
        if features is not None:
            return [self._encoded_tile_grid(feature, "LLaVA-NeXT") for feature in features]
        raise ValueError(
            f"the prompt has {count} image tokens but no image_sizes was passed: LLaVA-NeXT's token count depends on "
            "each image's size; pass every output of the processor (model(**inputs)), image_sizes included."
        )

    def _encoded_tile_grid(self, feature: torch.Tensor, family: str) -> tuple[int, int]:
        """(rows, cols) of the unpadded tile grid of one encoded image (T, D): the base image's tokens, then rows of
        `cols` tokens each closed by `image_newline`."""
        rows = int((feature[self.tokens_per_image :] == self.base.image_newline.to(feature)).all(dim=-1).sum())
        if rows == 0:
            raise ValueError(f"cannot find the image_newline rows of an encoded {family} image")
        return rows, (feature.shape[0] - self.tokens_per_image) // rows - 1

    def visual_layout(self, input_ids: torch.Tensor, inputs: dict | None = None) -> VisualLayout:
        inputs = inputs or {}
        is_image = input_ids == self.image_token_id
        counts = self.read(is_image.sum(dim=1))
        grids = self._image_grids(inputs, sum(counts)) if sum(counts) else []
        expected = sum(self.tokens_per_image + r * (c + 1) for r, c in grids)
        if expected != sum(counts):
            raise ValueError(
                f"image_sizes describes {len(grids)} image(s) with {expected} tokens (base {self.side}x{self.side}, "
                f"anyres tiles and newlines) but the prompt holds {sum(counts)} image tokens (id "
                f"{self.image_token_id}): pass the image_sizes the processor returned with these input_ids, as "
                "(height, width) of the original images."
            )
        order = torch.argsort((~is_image).to(torch.int8), dim=1, stable=True)
        positions, segments = [], []
        index = 0
        for b, count in enumerate(counts):
            run = order[b, :count]
            keep = torch.ones(count, dtype=torch.bool)
            sample_segments, used, offset, part = [], 0, 0, 0
            while used < count:
                if index >= len(grids):
                    raise ValueError(f"sample {b} has more image tokens than image_sizes describes")
                rows_u, cols_u = grids[index]
                base_len, tiles_len = self.tokens_per_image, rows_u * cols_u
                newline_at = used + base_len + torch.arange(1, rows_u + 1) * (cols_u + 1) - 1
                keep[newline_at] = False
                sample_segments.append(VisualSegment(offset, base_len, self.grid, index, kind="base", part=part))
                sample_segments.append(
                    VisualSegment(offset + base_len, tiles_len, (rows_u, cols_u), index, kind="tiles", part=part)
                )
                used += base_len + rows_u * (cols_u + 1)
                offset += base_len + tiles_len
                index, part = index + 1, part + 1
            positions.append(run[keep.to(run.device)])
            segments.append(sample_segments)
        return VisualLayout(positions=positions, segments=segments)

    def image_geometry(self, processor):
        raise ValueError(
            "LLaVA-NeXT images have no single fixed grid (base image plus anyres tiles): use padding_fractions"
        )

    def padding_fractions(self, layout: VisualLayout, image_sizes, processor) -> list[torch.Tensor]:
        """image_sizes: (width, height) of each image (PIL order, as the press takes them). The processor's
        pinpoints and tile size must be the model's."""
        image_processor = getattr(processor, "image_processor", processor)
        pinpoints = getattr(image_processor, "image_grid_pinpoints", None)
        crop = getattr(image_processor, "crop_size", None)
        crop_h = crop.get("height") if isinstance(crop, dict) else getattr(crop, "height", None)
        if (pinpoints is not None and [tuple(p) for p in pinpoints] != self.pinpoints) or (
            crop_h and crop_h != self.image_size
        ):
            raise ValueError(
                "the processor's image_grid_pinpoints or tile size differ from the model's: pass the processor that "
                "belongs to this model"
            )
        out = []
        for sample_segments in layout.segments:
            parts = []
            for segment in sample_segments:
                width, height = image_sizes[segment.image_index]
                if segment.kind == "base":
                    parts.append(torch.zeros(segment.length))
                else:
                    fractions = self.tile_padding(int(height), int(width))
                    if tuple(fractions.shape) != segment.grid:
                        raise ValueError(
                            f"image_sizes[{segment.image_index}]=({width}, {height}) gives a {tuple(fractions.shape)} "
                            f"tile grid but the prompt has {segment.grid}: pass each image's original (width, height)"
                        )
                    parts.append(fractions.reshape(-1))
            out.append(torch.cat(parts) if parts else torch.zeros(0))
        return out
