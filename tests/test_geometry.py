"""Padding geometry == pixel truth: images in a sentinel colour go through the real image processor, and
each patch's measured share of padding pixels must match `padded_fraction`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_processor
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from vtprune.debias.geometry import geometry_from_processor, padded_fraction, padding_mask

PATCH = 14
# bicubic resampling blurs the image border over about one pixel on each side
TOLERANCE = 2.0 / PATCH


def llava_processor(side: int) -> LlavaImageProcessorPil:
    return LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def measured_fraction(image_processor, size: tuple[int, int]) -> torch.Tensor:
    """(rows, cols) share of each patch's pixels closer to the padding colour than to the black image."""
    image = Image.new("RGB", size, (0, 0, 0))
    pixels = image_processor(image, return_tensors="np")["pixel_values"][0]  # (3, H, W), normalised
    mean, std = np.array(image_processor.image_mean), np.array(image_processor.image_std)
    black = (0.0 - mean) / std  # padding is the mean colour, i.e. ~0 after normalisation
    is_padding = np.abs(pixels - 0.0).sum(0) < np.abs(pixels - black[:, None, None]).sum(0)
    side = pixels.shape[-1] // PATCH
    blocks = is_padding.reshape(side, PATCH, side, PATCH).mean(axis=(1, 3))
    return torch.from_numpy(blocks).float()


def check(image_processor, side: int, size: tuple[int, int]) -> None:
    geometry = geometry_from_processor(image_processor, patch_size=PATCH, image_size=side)
    predicted = padded_fraction(geometry, size)
    measured = measured_fraction(image_processor, size)
    assert predicted.shape == measured.shape == geometry.grid
    assert (predicted - measured).abs().max() <= TOLERANCE + 1e-6, (size, predicted, measured)
    clear = (predicted - 0.5).abs() > TOLERANCE
    mask = padding_mask(geometry, size).view(geometry.grid)
    assert torch.equal(mask[clear], (measured > 0.5)[clear])


EDGE_SIZES = [(1, 1), (1, 4000), (4000, 1), (84, 84), (336, 336), (85, 84), (84, 85), (640, 480), (480, 640),
              (3, 1000), (999, 2), (13, 29), (1024, 7), (500, 499)]


@pytest.mark.parametrize("size", EDGE_SIZES)
def test_pad_to_square_matches_pixels(size):
    check(llava_processor(84), 84, size)


@pytest.mark.parametrize("size", [(640, 480), (1, 4000), (333, 500), (336, 200)])
def test_pad_to_square_matches_pixels_llava15_resolution(size):
    check(llava_processor(336), 336, size)


@settings(max_examples=40, deadline=None)
@given(width=st.integers(1, 4000), height=st.integers(1, 4000))
def test_pad_to_square_property(width, height):
    check(llava_processor(112), 112, (width, height))


@settings(max_examples=15, deadline=None)
@given(width=st.integers(1, 4000), height=st.integers(1, 4000))
def test_padding_band_is_symmetric_and_bounded(width, height):
    geometry = geometry_from_processor(llava_processor(336), patch_size=PATCH, image_size=336)
    fraction = padded_fraction(geometry, (width, height))
    assert fraction.min() >= 0 and fraction.max() <= 1
    real_share = 1 - fraction.mean()
    assert abs(real_share - min(width, height) / max(width, height)) < 1e-3 + 1 / 336
    if width >= height:  # bands on top and bottom only: rows are uniform
        assert torch.allclose(fraction, fraction[:, :1].expand_as(fraction))


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (84, 84), (30, 200)])
def test_clip_resize_and_crop_has_no_padding(size):
    clip = CLIPImageProcessorPil(do_pad=True, size={"shortest_edge": 84}, crop_size={"height": 84, "width": 84})
    geometry = geometry_from_processor(clip, patch_size=PATCH, image_size=84)
    assert not geometry.pad_to_square  # CLIP accepts do_pad and ignores it
    assert padded_fraction(geometry, size).max() == 0
    assert measured_fraction(clip, size).max() == 0


def test_exact_resize_has_no_padding():
    stretch = LlavaImageProcessorPil(do_pad=False, do_center_crop=False, size={"height": 84, "width": 84})
    geometry = geometry_from_processor(stretch, patch_size=PATCH, image_size=84)
    assert padded_fraction(geometry, (500, 20)).max() == 0
    assert measured_fraction(stretch, (500, 20)).max() == 0


def test_crop_larger_than_resize_counts_zero_padding():
    small = LlavaImageProcessorPil(do_pad=False, size={"shortest_edge": 56}, crop_size={"height": 84, "width": 84})
    geometry = geometry_from_processor(small, patch_size=PATCH, image_size=84)
    fraction = padded_fraction(geometry, (56, 56))
    assert fraction[0, 0] == 1 and fraction[3, 3] == 0


def test_accepts_the_processor_wrapper():
    processor = build_processor()
    geometry = geometry_from_processor(processor, patch_size=PATCH, image_size=84)
    assert geometry.pad_to_square and geometry.grid == (6, 6)


def test_bad_input():
    geometry = geometry_from_processor(llava_processor(84), patch_size=PATCH, image_size=84)
    with pytest.raises(ValueError, match="positive"):
        padded_fraction(geometry, (0, 10))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        geometry_from_processor(llava_processor(84), patch_size=PATCH, image_size=90)
    with pytest.raises(ValueError, match="expects 336x336"):
        geometry_from_processor(llava_processor(84), patch_size=PATCH, image_size=336)
    with pytest.raises(ValueError, match="not an image processor"):
        geometry_from_processor(object(), patch_size=PATCH, image_size=84)
