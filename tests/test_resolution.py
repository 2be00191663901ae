"""Resolution bins and resize-and-crop against diffusers' tables and PixArtImageProcessor."""

from __future__ import annotations

import pytest
import torch
from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_512_BIN, ASPECT_RATIO_1024_BIN
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
from diffusers.pipelines.sana.pipeline_sana import ASPECT_RATIO_4096_BIN

from sana.errors import SanaInputError
from sana.resolution import aspect_ratio_bins, closest_bin, resize_and_crop

DIFFUSERS_BINS = {16: ASPECT_RATIO_512_BIN, 32: ASPECT_RATIO_1024_BIN, 64: ASPECT_RATIO_2048_BIN, 128: ASPECT_RATIO_4096_BIN}


@pytest.mark.parametrize("sample_size", sorted(DIFFUSERS_BINS))
def test_bin_tables_equal_diffusers(sample_size):
    ours, theirs = aspect_ratio_bins(sample_size), DIFFUSERS_BINS[sample_size]
    assert list(ours) == list(theirs)  # key order decides ties
    for key, (height, width) in theirs.items():
        assert ours[key] == (height, width), key
        assert isinstance(ours[key][0], int) and isinstance(ours[key][1], int)


def test_unknown_sample_size_is_rejected():
    with pytest.raises(SanaInputError, match="sample_size 48"):
        aspect_ratio_bins(48)


def _requests():
    sides = [64, 100, 256, 333, 512, 640, 700, 768, 1000, 1024, 1080, 1280, 1920, 2048, 3000, 4096, 8000]
    yield from ((h, w) for h in sides for w in sides)
    # Ratios that fall exactly between two keys ("first wins" must match diffusers' min()).
    yield from [(1, 4), (3, 1), (97, 100), (100, 97), (1035, 1000), (1550, 1000), (2045, 1000), (2450, 1000)]


@pytest.mark.parametrize("sample_size", sorted(DIFFUSERS_BINS))
def test_closest_bin_equals_diffusers(sample_size):
    bins = aspect_ratio_bins(sample_size)
    for height, width in _requests():
        expected = PixArtImageProcessor.classify_height_width_bin(height, width, ratios=DIFFUSERS_BINS[sample_size])
        assert closest_bin(height, width, bins) == expected, (height, width)


def test_tie_goes_to_the_first_key():
    # A square request is equally far (0.5) from both keys; table order decides.
    assert closest_bin(100, 100, {"0.5": (10, 20), "1.5": (30, 20)}) == (10, 20)
    assert closest_bin(100, 100, {"1.5": (30, 20), "0.5": (10, 20)}) == (30, 20)


@pytest.mark.parametrize(
    ("source", "target"),
    [((768, 1280), (720, 1280)), ((1024, 1024), (1000, 1500)), ((704, 1408), (700, 1400)), ((64, 48), (50, 50)), ((32, 32), (32, 32))],
)
def test_resize_and_crop_equals_diffusers(source, target):
    images = torch.rand(2, 3, *source, generator=torch.Generator().manual_seed(0))
    expected = PixArtImageProcessor.resize_and_crop_tensor(images, new_width=target[1], new_height=target[0])
    ours = resize_and_crop(images, *target)
    assert ours.shape == (2, 3, *target)
    assert torch.equal(ours, expected)
