"""Image preprocessing: LLaVA's resize + center crop, or LLaVA-1.5's pad-to-square."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mmkit.errors import ConfigError, DataError
from mmkit.models.encoders.base import ImageStats

MODES = ("crop", "pad")


class ImageProcessor:
    """PIL image -> normalised ``[3, size, size]`` float tensor for one encoder."""

    def __init__(self, stats: ImageStats, mode: str = "pad") -> None:
        if mode not in MODES:
            raise ConfigError(f"data.image_mode={mode!r}: choose one of {', '.join(MODES)}")
        self.stats = stats
        self.mode = mode
        self._mean = torch.tensor(stats.mean).view(3, 1, 1)
        self._std = torch.tensor(stats.std).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        size = self.stats.size
        image = image.convert("RGB")
        if self.mode == "pad":
            image = self._pad_to_square(image).resize((size, size), Image.BICUBIC)
        else:
            image = self._resize_and_crop(image, size)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - self._mean) / self._std

    def _pad_to_square(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if width == height:
            return image
        side = max(width, height)
        # LLaVA-1.5 pads with the encoder's mean colour, which normalises to zero.
        fill = tuple(int(round(channel * 255)) for channel in self.stats.mean)
        canvas = Image.new("RGB", (side, side), fill)
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        return canvas

    @staticmethod
    def _resize_and_crop(image: Image.Image, size: int) -> Image.Image:
        width, height = image.size
        scale = size / min(width, height)
        resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
        left = (resized.width - size) // 2
        top = (resized.height - size) // 2
        return resized.crop((left, top, left + size, top + size))


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> fully decoded PIL image; a corrupt or truncated file raises DataError."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"undecodable image: {exc}") from None
    return image
