"""Which visual tokens are padding: the image processor's geometry, from original size to patch grid.

Follows transformers' image processors step by step (PIL and torchvision backends share the attributes):

1. pad to square (`do_pad=True` on processors that implement `pad_to_square`, e.g. LLaVA's): a canvas of
   side max(w, h), the image pasted at offset (max - short) // 2 on the short axis, the rest mean colour;
2. resize: `shortest_edge` S keeps the aspect ratio (short side S, long side int(S * long / short));
   `height`/`width` stretches to that size;
3. center crop to `crop_size`: offset (size - crop) // 2; a crop larger than the image pads it with zeros
   (offset ceil((crop - size) / 2)), which also counts as padding.

The real image then occupies a rectangle of the model input; each patch's padded fraction is one minus the
product of its per-axis overlaps with that rectangle (computed as outer products, no loops over patches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageGeometry:
    """How an image processor maps an original (w, h) image onto the vision tower's input and patch grid.

    resize: ("shortest_edge", S) or ("exact", (height, width)) or None (no resize).
    crop: (height, width) of the center crop, or None.
    """

    pad_to_square: bool
    resize: tuple[str, int | tuple[int, int]] | None
    crop: tuple[int, int] | None
    image_size: int
    patch_size: int

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return (side, side)


def _size_field(size, key: str):
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def geometry_from_processor(image_processor, *, patch_size: int, image_size: int) -> ImageGeometry:
    """Read the geometry of a transformers image processor (or a processor holding one in `.image_processor`).

    patch_size, image_size: the vision tower's (e.g. 14 and 336 for LLaVA-1.5)."""
    processor = getattr(image_processor, "image_processor", image_processor)
    if image_size <= 0 or patch_size <= 0 or image_size % patch_size:
        raise ValueError(f"image_size={image_size} must be a positive multiple of patch_size={patch_size}")
    if not hasattr(processor, "do_resize") and not hasattr(processor, "size"):
        raise ValueError(
            f"{type(processor).__name__} is not an image processor: pass the model's processor "
            "(AutoProcessor.from_pretrained(...)) or its image_processor."
        )
    # CLIP-style processors accept do_pad but do not implement it: only trust it where padding exists
    pad = bool(getattr(processor, "do_pad", False)) and hasattr(processor, "pad_to_square")
    resize = None
    if getattr(processor, "do_resize", True):
        size = getattr(processor, "size", None)
        shortest, longest = _size_field(size, "shortest_edge"), _size_field(size, "longest_edge")
        height, width = _size_field(size, "height"), _size_field(size, "width")
        if shortest and not longest:
            resize = ("shortest_edge", int(shortest))
        elif height and width:
            resize = ("exact", (int(height), int(width)))
        else:
            raise ValueError(
                f"{type(processor).__name__}.size={size!r}: vtprune models resizing by 'shortest_edge' or by "
                "'height'/'width' only; use Debias(padding=False) for this processor."
            )
    crop = None
    if getattr(processor, "do_center_crop", False):
        crop_size = getattr(processor, "crop_size", None)
        crop = (int(_size_field(crop_size, "height")), int(_size_field(crop_size, "width")))
    geometry = ImageGeometry(pad_to_square=pad, resize=resize, crop=crop, image_size=image_size, patch_size=patch_size)
    output = _output_size(geometry, (image_size, image_size))
    if output != (image_size, image_size):
        raise ValueError(
            f"{type(processor).__name__} produces {output[1]}x{output[0]} images but the vision tower expects "
            f"{image_size}x{image_size}: pass the processor that belongs to this model."
        )
    if crop is None and not pad and (resize is None or resize[0] == "shortest_edge"):
        raise ValueError(
            f"{type(processor).__name__} neither pads, crops nor resizes to a fixed size, so non-square images "
            "would not fit the vision tower's square input; vtprune cannot model this geometry."
        )
    return geometry


def _resized(geometry: ImageGeometry, width: int, height: int) -> tuple[int, int]:
    """(width, height) after the resize step."""
    if geometry.resize is None:
        return width, height
    kind, value = geometry.resize
    if kind == "exact":
        return value[1], value[0]
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(value * long / short)
    return (value, new_long) if width <= height else (new_long, value)


def _output_size(geometry: ImageGeometry, image_size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the model input for an original (w, h) image."""
    width, height = image_size
    if geometry.pad_to_square:
        width = height = max(width, height)
    width, height = _resized(geometry, width, height)
    if geometry.crop is not None:
        return geometry.crop
    return height, width


def _real_interval(length: int, start: float, end: float, resized: int, crop: int | None) -> tuple[float, float]:
    """Continuous [a, b) of the real image along one axis of the model input.

    length: the canvas side before resizing (padded or not); [start, end) the image inside it;
    resized: that side after resizing; crop: the crop along this axis, or None."""
    scale = resized / length
    a, b = start * scale, end * scale
    if crop is not None:
        offset = (resized - crop) // 2 if resized >= crop else -math.ceil((crop - resized) / 2)
        a, b = max(0.0, a - offset), min(float(crop), b - offset)
    return a, b


def _axis_overlap(a: float, b: float, patches: int, patch_size: int) -> torch.Tensor:
    """(patches,) share of each patch [j*p, (j+1)*p) covered by [a, b)."""
    lo = torch.arange(patches, dtype=torch.float64) * patch_size
    covered = (torch.minimum(lo + patch_size, torch.tensor(b)) - torch.maximum(lo, torch.tensor(a))).clamp(min=0)
    return covered / patch_size


def padded_fraction(geometry: ImageGeometry, image_size: tuple[int, int]) -> torch.Tensor:
    """(rows, cols) float32 in [0, 1]: share of each patch's pixels that are padding, for an original image
    of size (w, h) (PIL's `.size` order)."""
    width, height = (int(v) for v in image_size)
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {image_size} must be positive (width, height)")
    if geometry.pad_to_square:
        side = max(width, height)
        canvas_w = canvas_h = side
        left, top = (side - width) // 2, (side - height) // 2
    else:
        canvas_w, canvas_h, left, top = width, height, 0, 0
    resized_w, resized_h = _resized(geometry, canvas_w, canvas_h)
    crop_h, crop_w = geometry.crop if geometry.crop is not None else (None, None)
    x0, x1 = _real_interval(canvas_w, left, left + width, resized_w, crop_w)
    y0, y1 = _real_interval(canvas_h, top, top + height, resized_h, crop_h)
    rows, cols = geometry.grid
    overlap = torch.outer(_axis_overlap(y0, y1, rows, geometry.patch_size), _axis_overlap(x0, x1, cols, geometry.patch_size))
    return (1.0 - overlap).clamp(0.0, 1.0).float()


def padding_mask(geometry: ImageGeometry, image_size: tuple[int, int], threshold: float = 0.5) -> torch.Tensor:
    """(rows * cols,) bool, row-major: True where more than `threshold` of the patch is padding."""
    return padded_fraction(geometry, image_size).reshape(-1) > threshold
