"""Padding geometry == pixel truth: images in a sentinel colour go through the real (PIL) image processors,
each output pixel is classified as real (nearest to the sentinel) or padding (nearest to a fill colour), and
each patch's measured share of padding must match `padded_fraction`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_processor
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio
from transformers.image_utils import get_image_size_for_max_height_width
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from vtprune.adapters.geometry import ImageGeometry, Resize, geometry_from_processor, padded_fraction, padding_mask

PATCH = 14
# resampling blurs the image border over about one output pixel on each side
TOLERANCE = 2.0 / PATCH
SENTINEL = (255, 0, 255)  # far from the mean-colour fill (122, 116, 104) and from zero fills
SIZES = st.integers(1, 4000)


def llava(side: int, **kwargs) -> LlavaImageProcessorPil:
    kwargs = {"do_pad": True, "size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}} | kwargs
    return LlavaImageProcessorPil(**kwargs)


def measured_fraction(image_processor, size: tuple[int, int]) -> torch.Tensor:
    """(rows, cols) share of each patch's output pixels that are nearer to a fill colour than to the sentinel."""
    pixels = image_processor(Image.new("RGB", size, SENTINEL), return_tensors="np")["pixel_values"][0]  # (3, H, W)
    mean, std = np.array(image_processor.image_mean), np.array(image_processor.image_std)
    mean_fill = [int(m * 255) for m in mean]
    # real; LLaVA's mean-colour square pad; crop's zero fill (before normalising); generic pad's zeros (after)
    palette = np.stack([(np.array(rgb) / 255 - mean) / std for rgb in (SENTINEL, mean_fill, (0, 0, 0))] + [np.zeros(3)])
    distance = ((pixels[None] - palette[:, :, None, None]) ** 2).sum(1)  # (4, H, W)
    is_padding = distance.argmin(0) != 0
    rows, cols = is_padding.shape[0] // PATCH, is_padding.shape[1] // PATCH
    return torch.from_numpy(is_padding.reshape(rows, PATCH, cols, PATCH).mean(axis=(1, 3))).float()


def check(image_processor, side: int, size: tuple[int, int], tolerance: float = TOLERANCE) -> None:
    geometry = geometry_from_processor(image_processor, patch_size=PATCH, image_size=side)
    predicted = padded_fraction(geometry, size)
    measured = measured_fraction(image_processor, size)
    assert predicted.shape == measured.shape == geometry.grid
    assert predicted.dtype == torch.float32 and predicted.min() >= 0 and predicted.max() <= 1
    error = (predicted - measured).abs().max().item()
    assert error <= tolerance + 1e-6, (size, error, predicted, measured)
    mask = padding_mask(geometry, size).view(geometry.grid)
    clear = (predicted - 0.5).abs() > tolerance
    assert torch.equal(mask[clear], (measured > 0.5)[clear]), size


# --- pad to square (LLaVA-1.5), then resize shortest edge and center crop --------------------------------------

EDGE_SIZES = [(1, 1), (1, 4000), (4000, 1), (84, 84), (336, 336), (85, 84), (84, 85), (640, 480), (480, 640),
              (3, 1000), (999, 2), (13, 29), (1024, 7), (500, 499), (2, 3), (4000, 3999)]


@pytest.mark.parametrize("size", EDGE_SIZES)
def test_pad_to_square_matches_pixels(size):
    check(llava(84), 84, size)


@pytest.mark.parametrize("size", [(640, 480), (1, 4000), (333, 500), (336, 200)])
def test_pad_to_square_matches_pixels_at_llava15_resolution(size):
    check(llava(336), 336, size)


@settings(max_examples=40, deadline=None)
@given(width=SIZES, height=SIZES)
def test_pad_to_square_property(width, height):
    check(llava(112), 112, (width, height))


@settings(max_examples=30, deadline=None)
@given(width=SIZES, height=SIZES, do_pad=st.booleans(), shortest_edge=st.integers(40, 150))
def test_any_shortest_edge_and_crop_matches_pixels(width, height, do_pad, shortest_edge):
    """Resize below the crop (zero fill) or above it (cut), with or without the square pad."""
    check(llava(84, do_pad=do_pad, size={"shortest_edge": shortest_edge}), 84, (width, height))


@settings(max_examples=40, deadline=None)
@given(width=st.integers(1, 120), height=st.integers(1, 120), do_pad=st.booleans())
def test_integer_rounding_is_exact_without_resampling(width, height, do_pad):
    """No resize: pixels are copied, so the pad's left/top floor((max - short) / 2) and the crop's offsets
    (window floor((size - crop) / 2), zero fill ceil((crop - size) / 2)) must match to the pixel."""
    check(llava(84, do_pad=do_pad, do_resize=False), 84, (width, height), tolerance=0.0)


def test_pad_offset_rounds_down():
    geometry = geometry_from_processor(llava(84, do_resize=False), patch_size=PATCH, image_size=84)
    # 84x81: canvas 84, top pad (84 - 81) // 2 = 1 row, bottom 2 rows
    assert geometry.trace((84, 81))[1] == (0.0, 1.0, 84.0, 82.0)
    # 84x84 canvas of a 1x84 image, resized to 336: the real column is [41, 42) * 4
    resized = geometry_from_processor(llava(336), patch_size=PATCH, image_size=336)
    assert resized.trace((1, 84))[1] == (164.0, 0.0, 168.0, 336.0)


def test_band_width_matches_the_published_formula():
    """Continuous band (max - min) / (2 max) * side, as in the paper's code, up to the pad's integer floor."""
    geometry = geometry_from_processor(llava(336), patch_size=PATCH, image_size=336)
    for width, height in [(640, 480), (500, 333), (1000, 1)]:
        _, (x0, y0, x1, y1) = geometry.trace((width, height))
        band = (width - height) / (2 * width) * 336
        assert (x0, x1) == (0.0, 336.0)
        assert abs(y0 - band) <= 336 / width and abs((336 - y1) - band) <= 336 / width


@settings(max_examples=15, deadline=None)
@given(width=SIZES, height=SIZES)
def test_padding_band_is_symmetric_and_bounded(width, height):
    geometry = geometry_from_processor(llava(336), patch_size=PATCH, image_size=336)
    fraction = padded_fraction(geometry, (width, height))
    assert abs((1 - fraction.mean()) - min(width, height) / max(width, height)) < 1e-3 + 1 / 336
    # float64 overlaps: uniform up to rounding (e.g. 52x617 differs by 4e-15 between rows)
    if width >= height:  # bands on top and bottom only: each row is uniform
        torch.testing.assert_close(fraction, fraction[:, :1].expand_as(fraction), atol=1e-12, rtol=0)
    else:
        torch.testing.assert_close(fraction, fraction[:1, :].expand_as(fraction), atol=1e-12, rtol=0)


def test_mask_is_row_major():
    geometry = geometry_from_processor(llava(84), patch_size=PATCH, image_size=84)
    # wide: real rows [21, 63) of 84, so patch rows padded 1, 1/2, 0, 0, 1/2, 1
    mask = padding_mask(geometry, (800, 400))
    assert mask.shape == (36,) and mask.dtype == torch.bool
    assert mask[:6].all() and not mask[6:30].any() and mask[30:].all()
    assert not padding_mask(geometry, (800, 400), threshold=1.0).any()
    assert padding_mask(geometry, (800, 400), threshold=0.0).sum() == 24


# --- no square pad: CLIP-style resize + crop, stretch, generic pad ----------------------------------------------


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (84, 84), (30, 200), (1, 1), (4000, 5)])
def test_clip_resize_and_crop_has_no_padding_even_with_do_pad(size):
    clip = CLIPImageProcessorPil(do_pad=True, size={"shortest_edge": 84}, crop_size={"height": 84, "width": 84})
    geometry = geometry_from_processor(clip, patch_size=PATCH, image_size=84)
    assert not geometry.pad_to_square and geometry.pad_to is None  # no square pad; batch pad is a no-op here
    assert padded_fraction(geometry, size).max() == 0
    assert measured_fraction(clip, size).max() == 0


@pytest.mark.parametrize("size", [(300, 100), (100, 300), (70, 70), (1, 1), (999, 998)])
def test_generic_do_pad_with_pad_size_pads_bottom_right(size):
    """CLIP's do_pad (the backends' generic pad) really pads, after the crop, when pad_size is given."""
    letterbox = CLIPImageProcessorPil(
        size={"max_height": 70, "max_width": 70}, do_center_crop=False,
        do_pad=True, pad_size={"height": 84, "width": 84},
    )
    geometry = geometry_from_processor(letterbox, patch_size=PATCH, image_size=84)
    assert geometry.pad_to == (84, 84)
    assert padded_fraction(geometry, size)[-1].min() == 1  # the bottom row is always padding
    check(letterbox, 84, size)


@pytest.mark.parametrize("do_pad", [False, True])
@pytest.mark.parametrize("size", [(500, 20), (20, 500), (84, 84), (1, 1)])
def test_exact_resize(do_pad, size):
    stretch = llava(84, do_pad=do_pad, do_center_crop=False, size={"height": 84, "width": 84})
    geometry = geometry_from_processor(stretch, patch_size=PATCH, image_size=84)
    if not do_pad:
        assert padded_fraction(geometry, size).max() == 0
    check(stretch, 84, size)


def test_crop_larger_than_resize_is_zero_fill():
    small = llava(84, do_pad=False, size={"shortest_edge": 56})
    geometry = geometry_from_processor(small, patch_size=PATCH, image_size=84)
    fraction = padded_fraction(geometry, (56, 56))  # 56 inside 84: fill ceil(28 / 2) = 14 = one patch a side
    assert fraction[0].min() == 1 and fraction[:, 0].min() == 1 and fraction[1:5, 1:5].max() == 0
    check(small, 84, (56, 56), tolerance=0.0)


def test_torchvision_backend_places_small_images_one_pixel_earlier():
    crop = dict(pad_to_square=False, resize=None, crop=(84, 84), image_size=84, patch_size=PATCH)
    pil, torchvision = ImageGeometry(**crop), ImageGeometry(**crop, backend="torchvision")
    assert pil.trace((81, 84))[1] == (2.0, 0.0, 83.0, 84.0)  # ceil(3 / 2)
    assert torchvision.trace((81, 84))[1] == (1.0, 0.0, 82.0, 84.0)  # 3 // 2
    assert pil.trace((90, 84)) == torchvision.trace((90, 84))  # cutting rounds the same way


# --- the resize rules equal transformers' own size functions -----------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(width=SIZES, height=SIZES, short=st.integers(1, 1000), extra=st.integers(1, 1000))
def test_resize_rules_match_transformers(width, height, short, extra):
    image = np.broadcast_to(np.zeros((), np.uint8), (3, height, width))  # only the shape is read
    expected = get_resize_output_image_size(image, short, default_to_square=False, input_data_format="channels_first")
    assert Resize(shortest_edge=short).output_size(height, width) == tuple(expected)
    both = Resize(shortest_edge=short, longest_edge=short + extra)
    assert both.output_size(height, width) == get_size_with_aspect_ratio((height, width), short, short + extra)
    fit = Resize(max_height=short, max_width=extra)
    assert fit.output_size(height, width) == get_image_size_for_max_height_width((height, width), short, extra)
    assert Resize(height=short, width=extra).output_size(height, width) == (short, extra)


# --- inputs ---------------------------------------------------------------------------------------------------------


def test_accepts_the_processor_wrapper():
    processor = build_processor()
    geometry = geometry_from_processor(processor, patch_size=PATCH, image_size=84)
    assert geometry == geometry_from_processor(processor.image_processor, patch_size=PATCH, image_size=84)
    assert geometry.pad_to_square and geometry.grid == (6, 6)
    assert not geometry_from_processor(build_processor(do_pad=False), patch_size=PATCH, image_size=84).pad_to_square


def test_size_given_as_int_follows_default_to_square():
    processor = llava(84)
    processor.size, processor.crop_size = 84, 84  # converted at call time with default_to_square=False
    geometry = geometry_from_processor(processor, patch_size=PATCH, image_size=84)
    assert geometry.resize == Resize(shortest_edge=84) and geometry.crop == (84, 84)
    check(processor, 84, (640, 480))


def test_bad_sizes():
    geometry = geometry_from_processor(llava(84), patch_size=PATCH, image_size=84)
    for size in [(0, 10), (10, -1), (10.5, 3), (10,), "10x10"]:
        with pytest.raises(ValueError, match="image size"):
            padded_fraction(geometry, size)
    assert padded_fraction(geometry, (np.int64(5), torch.tensor(7))).shape == (6, 6)
    with pytest.raises(ValueError, match="threshold"):
        padding_mask(geometry, (5, 7), threshold=1.5)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        geometry_from_processor(llava(84), patch_size=PATCH, image_size=90)
    for bad in [{"patch_size": 0, "image_size": 84}, {"patch_size": PATCH, "image_size": -84},
                {"patch_size": 14.0, "image_size": 84}]:
        with pytest.raises(ValueError, match="positive integer"):
            geometry_from_processor(llava(84), **bad)


def test_unsupported_processors():
    with pytest.raises(ValueError, match="expects 336x336"):
        geometry_from_processor(llava(84), patch_size=PATCH, image_size=336)
    with pytest.raises(ValueError, match="expects 84x84"):  # no crop: the output keeps the aspect ratio
        geometry_from_processor(llava(84, do_pad=False, do_center_crop=False), patch_size=PATCH, image_size=84)
    with pytest.raises(ValueError, match="not an image processor"):
        geometry_from_processor(object(), patch_size=PATCH, image_size=84)
    with pytest.raises(ValueError, match="size="):
        geometry_from_processor(llava(84, size={"longest_edge": 84}), patch_size=PATCH, image_size=84)

    class Custom(LlavaImageProcessorPil):
        def resize(self, image, size, **kwargs):
            return super().resize(image, size, **kwargs)

    with pytest.raises(ValueError, match=r"Custom\.resize .*Debias\(padding=False\)"):
        geometry_from_processor(Custom(do_pad=True), patch_size=PATCH, image_size=224)
