"""Image preprocessing: LLaVA's center crop and LLaVA-1.5's pad-to-square with the mean colour."""
from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from mmkit.data.images import ImageProcessor, decode_image
from mmkit.errors import ConfigError, DataError
from mmkit.models.encoders.base import ImageStats

STATS = ImageStats(size=8, mean=(0.5, 0.25, 0.75), std=(0.5, 0.5, 0.5))


def wide_image() -> Image.Image:
    """16x8: left half red, right half blue."""
    image = Image.new("RGB", (16, 8), (255, 0, 0))
    image.paste((0, 0, 255), (8, 0, 16, 8))
    return image


def test_pad_fills_with_the_mean_colour_which_normalises_to_zero():
    pixels = ImageProcessor(STATS, "pad")(wide_image())
    assert pixels.shape == (3, 8, 8)
    # The 16x8 image is padded to 16x16, so the top and bottom quarter rows are padding.
    assert torch.allclose(pixels[:, 0, :], torch.zeros(3, 8), atol=0.02)
    assert torch.allclose(pixels[:, -1, :], torch.zeros(3, 8), atol=0.02)
    assert pixels[0, 4, 0] > 0.9 and pixels[2, 4, -1] > 0.4  # content kept: red left, blue right


def test_crop_keeps_the_centre_square():
    pixels = ImageProcessor(STATS, "crop")(wide_image())
    assert pixels.shape == (3, 8, 8)
    red = (pixels[0] * 0.5 + 0.5)  # un-normalise the red channel
    assert red[:, 0].mean() > 0.9 and red[:, -1].mean() < 0.1  # centre crop spans the red/blue border


def test_unknown_mode_names_the_key():
    with pytest.raises(ConfigError, match="data.image_mode='stretch'"):
        ImageProcessor(STATS, "stretch")


def test_decode_rejects_truncated_and_garbage_bytes():
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buffer, format="JPEG")
    assert decode_image(buffer.getvalue()).size == (32, 32)
    with pytest.raises(DataError, match="undecodable image"):
        decode_image(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(DataError, match="undecodable image"):
        decode_image(b"definitely not an image")
