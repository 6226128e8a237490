"""Image preprocessing: LLaVA's resize + center crop, or LLaVA-1.5's pad-to-square, as tensor ops.

The numbers are those of transformers' ``CLIPImageProcessor`` (its torchvision backend) for
``size={"shortest_edge": S}``, ``crop_size=S``, bicubic resampling and the encoder's mean/std:
the shortest edge is resized to ``S`` (the other to ``int(S * long / short)``) with antialiased
bicubic on the uint8 image, the centre ``S x S`` is cropped, and ``(x - 255 mean) / (255 std)``
is taken in float32. ``pad`` mode first pastes the image centred on a square canvas of the
encoder's mean colour (LLaVA-1.5's ``expand2square``), which normalises to zero.

Bytes go straight to a uint8 ``[3, H, W]`` tensor (``ImageProcessor.preprocess_bytes``): JPEG
through torchvision's libjpeg-turbo decoder, every other format through PIL. PNG stays on PIL on
purpose: torchvision 0.29's ``decode_png`` crashes the whole process (SIGSEGV after a libpng
error) on a PNG whose compressed rows are corrupt, where PIL raises an ordinary error.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as tvF

from mmkit.core.errors import ConfigError, DataError
from mmkit.core.interfaces import ImageStats

MODES = ("crop", "pad")
JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class ImageLimits:
    """How large an image mmkit decodes and preprocesses (config ``image_limits``; serve's ``limits``).

    Sides and area are read from the header, before any pixel is decoded. ``max_working_pixels``
    bounds what preprocessing allocates: the padded square in ``pad`` mode, the image resized to
    the encoder's size before its crop in ``crop`` mode. A 40000x1 PNG is 118 bytes and 40000
    pixels, yet its padded square is 1.6 billion, so the area alone bounds nothing.
    """

    max_side: int = 16384
    max_pixels: int = 50_000_000
    max_working_pixels: int = 67_108_864  # 8192 x 8192: 200 MB as uint8 RGB

    @classmethod
    def from_config(cls, node: Any) -> ImageLimits:
        """``image_limits`` of a config; a run folder saved before the key existed gets the defaults."""
        return cls(**node) if node is not None else cls()

    def check_size(self, width: int, height: int) -> None:
        if max(width, height) > self.max_side:
            raise DataError(f"image too large: {width}x{height} has a side over the limit of {self.max_side}")
        if width * height > self.max_pixels:
            raise DataError(f"image too large: {width}x{height} is over the limit of {self.max_pixels} pixels")


DEFAULT_LIMITS = ImageLimits()


class ImageProcessor:
    """An image (PIL, uint8 ``[3,H,W]`` tensor, or encoded bytes) -> normalised ``[3, size, size]`` float tensor.

    Tensors stay channels-last (``[3, H, W]`` views of ``H x W x 3`` memory) until the final
    float conversion: torch's uint8 antialiased resize works in that layout, so it is not
    transposed back and forth. The output is contiguous.
    """

    def __init__(self, stats: ImageStats, mode: str = "pad", limits: ImageLimits = DEFAULT_LIMITS) -> None:
        if mode not in MODES:
            raise ConfigError(f"data.image_mode={mode!r}: choose one of {', '.join(MODES)}")
        self.stats = stats
        self.mode = mode
        self.limits = limits
        # LLaVA-1.5 pads with the encoder's mean colour, which normalises to (about) zero; truncated
        # to uint8 as LLaVA's expand2square and transformers' LlavaImageProcessor do, so an exported
        # model's HF processor reproduces training's pixels exactly.
        self._fill = torch.tensor([int(channel * 255) for channel in stats.mean], dtype=torch.uint8)

    def __call__(self, image: Image.Image | torch.Tensor | bytes) -> torch.Tensor:
        if isinstance(image, (bytes, bytearray, memoryview)):
            return self.preprocess_bytes(bytes(image))
        if isinstance(image, torch.Tensor):
            return self.preprocess(image)
        self.check_size(*image.size)  # before pil_to_tensor copies it
        return self.preprocess(pil_to_tensor(image))

    def preprocess_bytes(self, data: bytes) -> torch.Tensor:
        """Encoded image bytes -> normalised ``[3, size, size]``; DataError if they do not decode."""
        return self.preprocess(self.decode(data))

    def decode(self, data: bytes) -> torch.Tensor:
        """Encoded bytes -> RGB uint8 ``[3, H, W]``, refused with DataError before decoding if over
        the limits, including the area preprocessing would need."""
        if (size := header_size(data)) is not None:
            self.check_size(*size)
        return decode_image_tensor(data, self.limits)

    def check_size(self, width: int, height: int) -> None:
        """DataError if a ``width`` x ``height`` image is over the limits, preprocessing's area included."""
        self.limits.check_size(width, height)
        if self.mode == "pad":
            working = max(width, height) ** 2
        else:
            short, long = sorted((width, height))
            working = self.stats.size * int(self.stats.size * long / max(short, 1))
        if working > self.limits.max_working_pixels:
            what = "padded to a square" if self.mode == "pad" else "resized before its crop"
            raise DataError(f"image too large: {width}x{height} {what} is {working} pixels, over the limit of "
                            f"{self.limits.max_working_pixels} (image_limits.max_working_pixels)")

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """RGB uint8 ``[3, H, W]`` -> normalised float32 ``[3, size, size]``."""
        return self.normalize(self.resize_and_crop(pixels))

    def resize_and_crop(self, pixels: torch.Tensor) -> torch.Tensor:
        """RGB uint8 ``[3, H, W]`` -> uint8 ``[3, size, size]`` (padded first in ``pad`` mode): all
        of the processing but the normalisation, so a loader can batch and ship 1 byte per value."""
        if pixels.dtype != torch.uint8 or pixels.ndim != 3 or pixels.shape[0] != 3:
            raise ValueError(f"expected an RGB uint8 [3, H, W] tensor, got {pixels.dtype} {tuple(pixels.shape)}")
        self.check_size(pixels.shape[2], pixels.shape[1])
        if self.mode == "pad":
            pixels = self._pad_to_square(pixels)
        pixels = self._resize_shortest_edge(pixels, self.stats.size)
        return _center_crop(pixels, self.stats.size)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``[..., 3, H, W]`` (one image or a batch, on any device) -> contiguous float32;
        the same numbers as ``preprocess``. Training ships uint8 and normalises on the device."""
        return self.stats.normalize(pixels)

    def _pad_to_square(self, pixels: torch.Tensor) -> torch.Tensor:
        _, height, width = pixels.shape
        if width == height:
            return pixels
        # The image centred at ((side - w) // 2, (side - h) // 2), as PIL's paste in expand2square.
        # Built as H x W x 3 (channels last), the layout decoders produce and the resize runs fastest on.
        side = max(width, height)
        rows = pixels.permute(1, 2, 0)
        dim, before = (0, (side - height) // 2) if width > height else (1, (side - width) // 2)
        band = list(rows.shape)
        band[dim] = before
        first = self._fill.expand(band)
        band[dim] = side - rows.shape[dim] - before
        return torch.cat([first, rows, self._fill.expand(band)], dim=dim).permute(2, 0, 1)

    @staticmethod
    def _resize_shortest_edge(pixels: torch.Tensor, size: int) -> torch.Tensor:
        _, height, width = pixels.shape
        # transformers' get_resize_output_image_size: the long edge is truncated, not rounded.
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(size * long / short)
        new_height, new_width = (new_long, size) if width <= height else (size, new_long)
        if (new_height, new_width) == (height, width):
            return pixels
        # uint8 in, uint8 out: torch's native antialiased bicubic kernel for uint8 (as transformers).
        return tvF.resize(
            pixels, [new_height, new_width], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True
        )


def _center_crop(pixels: torch.Tensor, size: int) -> torch.Tensor:
    _, height, width = pixels.shape
    top = int((height - size) / 2.0)
    left = int((width - size) / 2.0)
    return pixels[:, top : top + size, left : left + size]


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> RGB uint8 ``[3, H, W]``; transparency is composited onto white (as transformers does)."""
    if image.mode != "RGB":
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        else:
            image = image.convert("RGB")
    # A [3, H, W] view of the H x W x 3 array (channels-last strides), as torchvision's decoders return.
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header alone (~40 us, no pixel decoded); None if PIL cannot read
    the header, so the decoder gives the reason."""
    try:
        return Image.open(io.BytesIO(data)).size
    except Image.DecompressionBombError as exc:
        raise DataError(f"image too large: {exc}") from None
    except Exception:  # noqa: BLE001 - PIL raises several types for data that is not an image
        return None


def decode_image_tensor(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """Bytes -> RGB uint8 ``[3, H, W]``; a corrupt or truncated file raises DataError, and so does
    one over ``limits``, before its pixels are decoded."""
    if not data:
        raise DataError("undecodable image: the file is empty")
    if data[:3] != JPEG_MAGIC:
        return pil_to_tensor(decode_image(data, limits))
    if (size := header_size(data)) is not None:
        limits.check_size(*size)
    try:
        pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        # A JPEG variant libjpeg-turbo rejects may still be one PIL reads; if not, say why.
        reason = str(exc).rsplit(", ", 1)[-1].strip()
        try:
            return pil_to_tensor(decode_image(data, limits))
        except DataError:
            raise DataError(f"undecodable image: JPEG: {reason}") from None
    limits.check_size(pixels.shape[2], pixels.shape[1])
    return pixels


def read_image_file(
    path: Path, limits: ImageLimits | ImageProcessor = DEFAULT_LIMITS, name: str | None = None
) -> Image.Image:
    """The image file at ``path``, decoded, as :func:`decode_image`. A DataError starts with
    ``name`` (default: the path), so the user sees which file is at fault."""
    name = name or str(path)
    try:
        return decode_image(Path(path).read_bytes(), limits)
    except OSError as exc:
        raise DataError(f"{name}: {exc.strerror or exc}") from None
    except DataError as exc:
        raise DataError(f"{name}: {exc}") from None


def decode_image(data: bytes, limits: ImageLimits | ImageProcessor = DEFAULT_LIMITS) -> Image.Image:
    """Bytes -> fully decoded PIL image; a corrupt or truncated file raises DataError, and so does
    one over ``limits``, before its pixels are decoded (an ImageProcessor's limits include the area
    its preprocessing needs)."""
    try:
        image = Image.open(io.BytesIO(data))
        limits.check_size(*image.size)
        image.load()
    except UnidentifiedImageError:
        raise DataError("undecodable image: not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"image too large: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise DataError(f"undecodable image: {exc}") from None
    return image
