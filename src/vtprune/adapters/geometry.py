"""Which visual tokens are padding: the image processor's geometry, from the original image to the patch grid.

Mirrors the steps of transformers' (5.x) image processors, which both backends (PIL and torchvision) share
through the same attributes (`do_pad`, `do_resize`, `size`, `do_center_crop`, `crop_size`, `pad_size`):

1. pad to square (LLaVA's `_preprocess` with `do_pad=True`): a canvas of side max(w, h), the image pasted at
   offset floor((max - short) / 2) on its short axis, the rest the mean colour;
2. resize, the first rule of `size` that applies: `shortest_edge` + `longest_edge`, `shortest_edge` (short
   side S, long side int(S * long / short)), `max_height` + `max_width` (fit inside, int() of both sides),
   `height` + `width` (stretch);
3. center crop to `crop_size`: crop window offset floor((size - crop) / 2); an axis shorter than the crop is
   filled with zeros, the image at offset ceil((crop - size) / 2) (PIL) or floor (torchvision);
4. generic `do_pad` (all other processors, after the crop): zeros on the bottom and right up to `pad_size`.

The real image then occupies a rectangle of the model input in continuous pixel coordinates (resampling maps
[0, n_in) linearly onto [0, n_out)); a patch's padded share is one minus the product of its per-axis overlaps
with that rectangle.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal

import torch

Backend = Literal["pil", "torchvision"]

# Classes whose methods define the pipeline above (by module and class name: the torchvision modules cannot be
# imported without torchvision, and this check must not need it).
_BASE = {("transformers.image_processing_utils", "BaseImageProcessor")}
_BACKENDS = {
    ("transformers.image_processing_backends", "PilBackend"),
    ("transformers.image_processing_backends", "TorchvisionBackend"),
}
_LLAVA = {
    ("transformers.models.llava.image_processing_pil_llava", "LlavaImageProcessorPil"),
    ("transformers.models.llava.image_processing_llava", "LlavaImageProcessor"),
}


@dataclass(frozen=True)
class Resize:
    """The resize step, as the backends' `resize` reads a `size` dict: the first complete rule wins, in the order
    shortest_edge + longest_edge, shortest_edge, max_height + max_width, height + width."""

    shortest_edge: int | None = None
    longest_edge: int | None = None
    max_height: int | None = None
    max_width: int | None = None
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        if not (self.shortest_edge or (self.max_height and self.max_width) or (self.height and self.width)):
            raise ValueError(
                f"{self}: a resize needs 'shortest_edge', 'max_height' and 'max_width', or 'height' and 'width'"
            )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing a (height, width) image, with the processor's integer rounding."""
        if self.shortest_edge and self.longest_edge:
            return _fit_short_and_long(height, width, self.shortest_edge, self.longest_edge)
        if self.shortest_edge:
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(self.shortest_edge * long / short)
            return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)
        if self.max_height and self.max_width:
            scale = min(self.max_height / height, self.max_width / width)
            return int(height * scale), int(width * scale)
        return self.height, self.width


def _fit_short_and_long(height: int, width: int, size: int, max_size: int) -> tuple[int, int]:
    """(height, width): short side `size`, unless the long side would exceed `max_size` (then long side about
    `max_size`); an image whose short side already equals the target keeps its size."""
    raw = None
    low, high = float(min(height, width)), float(max(height, width))
    if high / low * size > max_size:
        raw = max_size * low / high
        size = round(raw)
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    base = size if raw is None else raw
    if width < height:
        return int(base * height / width), size
    return size, int(base * width / height)


@dataclass(frozen=True)
class ImageGeometry:
    """How an image processor maps an original (w, h) image onto the vision tower's square input and patch grid.

    pad_to_square: LLaVA-style centred pad to a square canvas, before resizing.
    resize: the resize step, or None.
    crop: (height, width) of the center crop, or None.
    pad_to: (height, width) of the bottom/right zero padding after the crop (generic `do_pad` with `pad_size`).
    image_size, patch_size: the vision tower's square input side and patch side (e.g. 336 and 14).
    backend: "pil" or "torchvision"; they differ only in where an image smaller than the crop sits (1 pixel).
    """

    pad_to_square: bool
    resize: Resize | None
    crop: tuple[int, int] | None
    image_size: int
    patch_size: int
    pad_to: tuple[int, int] | None = None
    backend: Backend = "pil"

    def __post_init__(self) -> None:
        _check_tower(self.image_size, self.patch_size)
        if self.backend not in ("pil", "torchvision"):
            raise ValueError(f"backend={self.backend!r}: use 'pil' or 'torchvision'")

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of patches, e.g. (24, 24) for 336 / 14."""
        side = self.image_size // self.patch_size
        return (side, side)

    @property
    def pads(self) -> bool:
        """Whether this processor leaves padding in any image (probed on a wide and a tall image): False for
        resize + center crop (CLIP) or a plain resize, where padding debiasing has nothing to act on."""
        side = self.image_size
        return any(
            bool((padded_fraction(self, size) > 0).any()) for size in ((2 * side + 3, side), (side, 2 * side + 3))
        )

    def trace(self, image_size: tuple[int, int]) -> tuple[tuple[int, int], tuple[float, float, float, float]]:
        """Follow an original (w, h) image through the steps.

        Returns the output (height, width) and the real image's box (x0, y0, x1, y1) in it, continuous pixels."""
        width, height = _as_size(image_size)
        x0, x1, y0, y1 = 0.0, float(width), 0.0, float(height)
        if self.pad_to_square:
            side = max(width, height)
            left, top = (side - width) // 2, (side - height) // 2
            x0, x1, y0, y1 = float(left), float(left + width), float(top), float(top + height)
            width = height = side
        if self.resize is not None:
            new_height, new_width = self.resize.output_size(height, width)
            if new_height <= 0 or new_width <= 0:
                raise ValueError(f"the processor resizes a {width}x{height} image to {new_width}x{new_height} pixels")
            sx, sy = new_width / width, new_height / height
            x0, x1, y0, y1 = x0 * sx, x1 * sx, y0 * sy, y1 * sy
            width, height = new_width, new_height
        if self.crop is not None:
            crop_height, crop_width = self.crop
            dx, dy = self._crop_shift(width, crop_width), self._crop_shift(height, crop_height)
            x0, x1 = max(0.0, x0 + dx), min(float(crop_width), x1 + dx)
            y0, y1 = max(0.0, y0 + dy), min(float(crop_height), y1 + dy)
            width, height = crop_width, crop_height
        if self.pad_to is not None:
            if self.pad_to[0] < height or self.pad_to[1] < width:
                raise ValueError(f"pad_size {self.pad_to} is smaller than the {height}x{width} (h x w) image it pads")
            height, width = self.pad_to
        return (height, width), (x0, y0, x1, y1)

    def _crop_shift(self, size: int, crop: int) -> int:
        """Shift of coordinates along one axis by the center crop (negative: window offset; positive: fill)."""
        if size >= crop:
            return -((size - crop) // 2)
        excess = crop - size
        return math.ceil(excess / 2) if self.backend == "pil" else excess // 2


def _check_tower(image_size: Any, patch_size: Any) -> None:
    for name, value in (("image_size", image_size), ("patch_size", patch_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")


def _as_size(image_size: Any) -> tuple[int, int]:
    """(w, h) as positive ints (accepts ints, numpy ints and integer 0-d tensors)."""
    try:
        width, height = image_size
        size = (int(width.__index__()), int(height.__index__()))
    except (TypeError, ValueError, AttributeError):
        raise ValueError(f"image size {image_size!r} must be a pair of integers (width, height)") from None
    if min(size) <= 0:
        raise ValueError(f"image size {image_size!r} must be positive (width, height)")
    return size


def _owner(obj: Any, name: str) -> tuple[str, str] | None:
    """(module, class name) of the class in obj's MRO that defines `name`, or None."""
    for cls in type(obj).__mro__:
        if name in vars(cls):
            return cls.__module__, cls.__name__
    return None


def _size_dict(value: Any, name: str, default_to_square: bool) -> dict | None:
    """A `size`-like attribute as a plain dict, converted the way the processor does at call time."""
    if value is None:
        return None
    from transformers.image_processing_utils import get_size_dict

    try:
        size = dict(get_size_dict(value, default_to_square=default_to_square, param_name=name))
    except (TypeError, ValueError) as error:
        raise ValueError(f"image processor attribute {name}={value!r} is not a valid size: {error}") from None
    return {key: v for key, v in size.items() if v}


def geometry_from_processor(image_processor: Any, *, patch_size: int, image_size: int) -> ImageGeometry:
    """Read the geometry of a transformers image processor (or a processor holding one in `.image_processor`).

    patch_size, image_size: the vision tower's (e.g. 14 and 336 for LLaVA-1.5). Raises ValueError for
    processors whose steps are not the standard ones above, or whose output is not image_size x image_size
    for every input size. Per-call overrides (e.g. `processor(images, do_pad=False)`) are not seen."""
    _check_tower(image_size, patch_size)
    processor = image_processor
    if getattr(processor, "image_processor", None) is not None:
        processor = processor.image_processor
    name = type(processor).__name__
    if _owner(processor, "_preprocess") is None or _owner(processor, "size") is None:
        raise ValueError(
            f"{name} is not an image processor: pass the model's processor (AutoProcessor.from_pretrained(...)) "
            "or its image_processor."
        )
    llava = _owner(processor, "_preprocess") in _LLAVA
    do_pad = bool(getattr(processor, "do_pad", None))
    used = ["preprocess", "_preprocess_image_like_inputs", "_standardize_kwargs", "_preprocess"]
    used += ["resize"] if getattr(processor, "do_resize", None) else []
    used += ["center_crop"] if getattr(processor, "do_center_crop", None) else []
    used += ["pad_to_square"] if llava and do_pad else ["pad"] if do_pad else []
    for method in used:
        owner = _owner(processor, method)
        allowed = {"pad_to_square": _LLAVA, "_preprocess": _BACKENDS | _LLAVA}.get(method, _BACKENDS | _BASE)
        if owner not in allowed:
            raise ValueError(
                f"{name}.{method} is defined by {owner and '.'.join(owner)}, not by transformers' standard "
                "pad/resize/crop pipeline (LLaVA's or the PIL/torchvision backends'), so vtprune cannot model its "
                "geometry (anyres tiles, dynamic resolution, custom steps). Use Debias(padding=False) with this "
                "processor."
            )
    default_to_square = bool(getattr(processor, "default_to_square", True))
    resize = None
    if getattr(processor, "do_resize", None):
        size = _size_dict(getattr(processor, "size", None), "size", default_to_square)
        try:
            resize = Resize(**{k: int(v) for k, v in (size or {}).items() if k in Resize.__dataclass_fields__})
        except ValueError:
            raise ValueError(
                f"{name}.size={size!r} has no resize rule (shortest_edge, max_height/max_width, height/width): "
                "set a valid `size` or do_resize=False."
            ) from None
    crop = None
    if getattr(processor, "do_center_crop", None):
        crop_size = _size_dict(getattr(processor, "crop_size", None), "crop_size", True) or {}
        if not (crop_size.get("height") and crop_size.get("width")):
            raise ValueError(f"{name}.crop_size={crop_size!r} needs 'height' and 'width' when do_center_crop=True")
        crop = (int(crop_size["height"]), int(crop_size["width"]))
    pad_to = None
    if do_pad and not llava:
        pad_size = _size_dict(getattr(processor, "pad_size", None), "pad_size", True)
        # without pad_size the batch is padded to its largest image: a no-op when every output has the same size,
        # which the check below demands
        if pad_size is not None:
            if not (pad_size.get("height") and pad_size.get("width")):
                raise ValueError(f"{name}.pad_size={pad_size!r} needs 'height' and 'width' when do_pad=True")
            pad_to = (int(pad_size["height"]), int(pad_size["width"]))
    backend: Literal["pil", "torchvision"] = (
        "torchvision" if getattr(processor, "backend", "pil") == "torchvision" else "pil"
    )
    geometry = ImageGeometry(
        pad_to_square=llava and do_pad,
        resize=resize,
        crop=crop,
        pad_to=pad_to,
        image_size=image_size,
        patch_size=patch_size,
        backend=backend,
    )
    _check_fixed_output(geometry, name)
    return geometry


def _check_fixed_output(geometry: ImageGeometry, name: str) -> None:
    """Every input size must come out as image_size x image_size (else the tower could not take it); probed on a
    few aspect ratios mild enough that no standard resize rule collapses a side to zero."""
    side = geometry.image_size
    for probe in ((side, side), (1, 1), (5, 3), (3 * side + 1, side), (side, 2 * side + 3)):
        output: tuple[int, int] | ValueError
        try:
            output = geometry.trace(probe)[0]
        except ValueError as error:
            output = error
        if output != (side, side):
            shown = f"an error ({output})" if isinstance(output, ValueError) else f"{output[1]}x{output[0]}"
            raise ValueError(
                f"{name} turns a {probe[0]}x{probe[1]} image into {shown} ({geometry}), but the vision tower "
                f"expects {side}x{side} for every image: pass the processor that belongs to this model (its "
                f"crop_size, or a size with height/width, must give {side}x{side})."
            )


def _axis_overlap(start: float, end: float, patches: int, patch_size: int) -> torch.Tensor:
    """(patches,) float64: share of each patch [j*p, (j+1)*p) covered by [start, end)."""
    low = torch.arange(patches, dtype=torch.float64) * patch_size
    covered = (low + patch_size).clamp(max=end) - low.clamp(min=start)
    return covered.clamp(min=0.0) / patch_size


def padded_fraction(geometry: ImageGeometry, image_size: tuple[int, int]) -> torch.Tensor:
    """(rows, cols) float32 in [0, 1]: share of each patch's pixels that are padding, for an original image of
    size (w, h) (PIL's `.size` order)."""
    (height, width), (x0, y0, x1, y1) = geometry.trace(image_size)
    if (height, width) != (geometry.image_size, geometry.image_size):
        raise ValueError(
            f"a {image_size} (w, h) image becomes {width}x{height}, not the vision tower's "
            f"{geometry.image_size}x{geometry.image_size}"
        )
    rows, cols = geometry.grid
    real = torch.outer(
        _axis_overlap(y0, y1, rows, geometry.patch_size), _axis_overlap(x0, x1, cols, geometry.patch_size)
    )
    return (1.0 - real).clamp(0.0, 1.0).float()


def padding_mask(geometry: ImageGeometry, image_size: tuple[int, int], threshold: float = 0.5) -> torch.Tensor:
    """(rows * cols,) bool, row-major: True where more than `threshold` of the patch is padding."""
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold={threshold} must lie in [0, 1]")
    return padded_fraction(geometry, image_size).reshape(-1) > threshold


def no_padding_message(processor) -> str:
    """The warning for padding debiasing with a processor that never pads, naming its settings."""
    images = getattr(processor, "image_processor", None) or processor
    name = type(images).__name__
    settings = ", ".join(
        f"{attr}={getattr(images, attr)!r}"
        for attr in ("do_pad", "do_center_crop", "do_resize")
        if hasattr(images, attr)
    )
    return (
        f"padding debiasing is on, but {name} does not pad images ({settings}): no visual token is padding, so it "
        f"changes nothing. To pad to a square as LLaVA-1.5 was trained, set {name}.do_pad=True on a LLaVA image "
        "processor (vtprune.apps.loading.set_pad_to_square(processor) does it for any LLaVA-1.5 processor); else pass "
        "Debias(padding=False)."
    )


# --- image sizes of a request ------------------------------------------------------------------------------
SIZE_CONVENTION = (
    "vtprune's image_sizes are PIL's (width, height), e.g. [image.size], while the image_sizes transformers' "
    "processors return are (height, width): pass images=[...] (the PIL images) instead, or leave image_sizes out "
    "where the processor's inputs carry their own"
)


def sizes_from_images(images) -> list[tuple[int, int]]:
    """(width, height) of each PIL image (the `images=` argument of a press)."""
    out = []
    for index, image in enumerate(images):
        size = getattr(image, "size", None)
        if not (isinstance(size, tuple) and len(size) == 2):
            raise ValueError(
                f"images[{index}] is a {type(image).__name__}, not a PIL image: pass the PIL images the "
                "processor was given, or image_sizes=[(width, height), ...]"
            )
        out.append((int(size[0]), int(size[1])))
    return out


def combine_image_sizes(images, image_sizes):
    """A press's `images=` (PIL images) and `image_sizes=` ((width, height) each) as one list of sizes (None when
    neither is given); both given must agree."""
    if images is None:
        return image_sizes
    if isinstance(images, (str, bytes)) or not hasattr(images, "__iter__"):
        raise ValueError(f"images={images!r}: give a list of the batch's PIL images, e.g. images=[image]")
    sizes = sizes_from_images(list(images))
    if image_sizes is not None:
        given = [tuple(size) for size in image_sizes]
        if given != sizes:
            raise ValueError(
                f"image_sizes={given} disagrees with the sizes of images= {sizes}: give one of them (images= is enough)"
            )
    return sizes


def images_per_sample(layout) -> list[int]:
    """How many images (not video frames) each sample of a request holds."""
    return [len({seg.image_index for seg in sample if seg.kind != "frame"}) for sample in layout.segments]


def expand_sizes(sizes: list, layout) -> list:
    """`sizes` (one per image of the batch as the caller built it) for a batch that generate() expanded k times
    (beam search, num_return_sequences: every sample repeated k times in a row): each sample's sizes repeated
    k times. Unchanged when the counts already match, or when the batch is not such an expansion (the caller's
    count check then names the mismatch)."""
    per = images_per_sample(layout)
    if not sizes or sum(per) == len(sizes) or sum(per) % len(sizes):
        return sizes
    k = sum(per) // len(sizes)
    if len(per) % k:
        return sizes
    groups = [per[g : g + k] for g in range(0, len(per), k)]
    if any(len(set(group)) != 1 for group in groups):
        return sizes
    out, start = [], 0
    for group in groups:
        out += sizes[start : start + group[0]] * k
        start += group[0]
    return out


def request_image_sizes(given, from_inputs, layout) -> list | None:
    """The (width, height) of every image of a request, for the padding geometry.

    given: what the caller passed (PIL (width, height) per image, in prompt order) or None. from_inputs: the
    `image_sizes` the processor put in the model's inputs ((height, width) rows: LLaVA-NeXT, LLaVA-OneVision),
    or None. Both are expanded to a batch that generate() expanded (`expand_sizes`). When both are there they
    must agree: a caller's list that matches the inputs only with width and height swapped is a ValueError
    naming the convention, any other disagreement a ValueError naming the image."""
    inputs = None
    if from_inputs is not None:
        rows = from_inputs.tolist() if hasattr(from_inputs, "tolist") else list(from_inputs)
        try:
            inputs = [(int(w), int(h)) for h, w in rows]
        except (TypeError, ValueError):
            inputs = None  # not (height, width) pairs: leave them to the model
    if given is None:
        return inputs
    given = expand_sizes(list(given), layout)
    if inputs is None or len(inputs) != len(given):
        return given
    for index, (mine, theirs) in enumerate(zip(given, inputs)):
        if tuple(mine) == theirs:
            continue
        if tuple(mine) == theirs[::-1]:
            raise ValueError(
                f"image_sizes[{index}]={tuple(mine)} is (height, width) of an image whose processor "
                f"inputs say width {theirs[0]}, height {theirs[1]}: {SIZE_CONVENTION}"
            )
        raise ValueError(
            f"image_sizes[{index}]={tuple(mine)} disagrees with the processor's image_sizes for that "
            f"image (width {theirs[0]}, height {theirs[1]}): give the size of each image in prompt order"
        )
    return given


__all__ = [
    "ImageGeometry",
    "Resize",
    "geometry_from_processor",
    "padded_fraction",
    "padding_mask",
    "no_padding_message",
    "SIZE_CONVENTION",
    "sizes_from_images",
    "combine_image_sizes",
    "expand_sizes",
    "request_image_sizes",
]
