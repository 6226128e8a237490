"""Image preprocessing: LLaVA's center crop and LLaVA-1.5's pad-to-square with the mean colour,
as tensor ops that reproduce transformers' CLIP image processor."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmkit.core.errors import ConfigError, DataError
from mmkit.core.interfaces import ImageStats
from mmkit.data.images import ImageProcessor, decode_image, decode_image_tensor

STATS = ImageStats(size=8, mean=(0.5, 0.25, 0.75), std=(0.5, 0.5, 0.5))
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_336 = ImageStats(size=336, mean=CLIP_MEAN, std=CLIP_STD)
# (width, height): landscape and portrait like COCO, square, tiny, large, and an awkward ratio.
SHAPES = [(500, 375), (375, 500), (400, 400), (7, 5), (1600, 1200), (337, 1000)]
# Against the torchvision-backed processor the result is bit-identical; this only absorbs float noise.
FAST_TOLERANCE = 1e-6
# Against the PIL-backed processor: PIL's bicubic and torch's antialiased bicubic round differently,
# by a few uint8 levels at most (one level is 1 / (255 std), about 0.015 here).
PIL_MAX_TOLERANCE = 5 / (255 * min(CLIP_STD))
PIL_MEAN_TOLERANCE = 0.005


def wide_image() -> Image.Image:
    """16x8: left half red, right half blue."""
    image = Image.new("RGB", (16, 8), (255, 0, 0))
    image.paste((0, 0, 255), (8, 0, 16, 8))
    return image


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour regions plus noise: the detail and edges of a photo, deterministic."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.int16)
    noisy = smooth + rng.integers(-24, 25, (height, width, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def expand2square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """LLaVA-1.5's pad-to-square, verbatim (PIL)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


@pytest.fixture(scope="module")
def clip_processors():
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    settings = {
        "size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}, "do_center_crop": True,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "resample": Image.BICUBIC,
    }
    fast = CLIPImageProcessor(**settings)
    assert fast.backend == "torchvision"  # transformers 5: the default CLIP processor is the torchvision one
    return fast, CLIPImageProcessorPil(**settings)


def reference_input(data: bytes, mode: str) -> Image.Image:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return expand2square(image, tuple(int(m * 255) for m in CLIP_MEAN)) if mode == "pad" else image


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


@pytest.mark.parametrize("mode", ["crop", "pad"])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_the_hf_clip_processor(tmp_path: Path, clip_processors, shape, fmt, mode):
    fast, slow = clip_processors
    path = tmp_path / f"image.{fmt.lower()}"
    photo_like(*shape).save(path, format=fmt, quality=90)
    data = path.read_bytes()
    processor = ImageProcessor(CLIP_336, mode)

    ours = processor.preprocess_bytes(data)
    assert ours.shape == (3, 336, 336) and ours.dtype == torch.float32
    # The PIL entry point gives the same tensor as the bytes one.
    assert torch.equal(processor(Image.open(path)), ours)

    reference = reference_input(data, mode)
    fast_out = fast(reference, return_tensors="pt")["pixel_values"][0]
    assert (ours - fast_out).abs().max().item() <= FAST_TOLERANCE
    slow_diff = (ours - slow(reference, return_tensors="pt")["pixel_values"][0]).abs()
    assert slow_diff.max().item() <= PIL_MAX_TOLERANCE
    assert slow_diff.mean().item() <= PIL_MEAN_TOLERANCE


def test_jpeg_decoding_equals_pil():
    buffer = io.BytesIO()
    photo_like(123, 77).save(buffer, format="JPEG", quality=80)
    expected = torch.from_numpy(np.array(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(decode_image_tensor(buffer.getvalue()), expected)


def _rgba(image: Image.Image) -> Image.Image:
    alpha = Image.linear_gradient("L").resize(image.size)  # transparent at the top, opaque at the bottom
    rgba = image.convert("RGBA")
    rgba.putalpha(alpha)
    return rgba


def _palette_with_transparency(image: Image.Image) -> Image.Image:
    palette = image.convert("P", palette=Image.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    return palette


CONVERSIONS = {
    "L": lambda image: image.convert("L"),
    "LA": lambda image: _rgba(image).convert("LA"),
    "RGBA": _rgba,
    "P": lambda image: image.convert("P", palette=Image.ADAPTIVE, colors=16),
    "P+transparency": _palette_with_transparency,
    "1": lambda image: image.convert("1"),
}


# What each format can store: JPEG only grey and colour, GIF no alpha channel.
STORABLE = [
    (kind, fmt)
    for kind in CONVERSIONS
    for fmt in ("PNG", "GIF", "WEBP", "JPEG")
    if not (fmt == "JPEG" and kind != "L") and not (fmt == "GIF" and kind in ("RGBA", "LA"))
]


@pytest.mark.parametrize(("kind", "fmt"), STORABLE)
def test_other_colour_modes_become_rgb(clip_processors, kind, fmt):
    image = CONVERSIONS[kind](photo_like(60, 40, seed=3))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    data = buffer.getvalue()

    pixels = decode_image_tensor(data)
    assert pixels.shape == (3, 40, 60) and pixels.dtype == torch.uint8
    ours = ImageProcessor(CLIP_336, "crop").preprocess_bytes(data)
    # transformers composites any transparency onto white, and so does mmkit.
    fast_out = clip_processors[0](Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"][0]
    assert (ours - fast_out).abs().max().item() <= FAST_TOLERANCE


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert decode_image_tensor(buffer.getvalue()).eq(255).all()


def test_a_tensor_goes_through_like_an_image():
    image = photo_like(50, 30)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    processor = ImageProcessor(CLIP_336, "pad")
    assert torch.equal(processor(tensor), processor(image))
    with pytest.raises(ValueError, match="RGB uint8"):
        processor(tensor.float())


def test_decode_rejects_truncated_and_garbage_bytes():
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buffer, format="JPEG")
    assert decode_image(buffer.getvalue()).size == (32, 32)
    with pytest.raises(DataError, match="undecodable image"):
        decode_image(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(DataError, match="undecodable image"):
        decode_image(b"definitely not an image")


def _png_with_bad_rows() -> bytes:
    """A PNG whose chunks and checksums are intact but whose rows use an invalid filter type:
    torchvision 0.29's decode_png dies on it with SIGSEGV, PIL reports an error."""
    rows = b"".join(bytes([7]) + bytes(3 * 8) for _ in range(8))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    photo_like(64, 48).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"definitely not an image", "not a recognised image format"),
        (_encoded("JPEG")[: len(_encoded("JPEG")) // 2], "truncated"),
        (_encoded("JPEG")[:-2], "truncated"),
        (_encoded("JPEG")[:2] + b"\xff\xc4\x00\x03\x00" + _encoded("JPEG")[2:], ""),
        (_encoded("PNG")[: len(_encoded("PNG")) // 2], "truncated"),
        (_encoded("PNG")[:60] + b"\xff" * 40 + _encoded("PNG")[100:], ""),
        (_png_with_bad_rows(), ""),
        (_encoded("WEBP")[:-10], ""),
    ],
    ids=["empty", "garbage", "jpeg-half", "jpeg-no-end", "jpeg-zeroed", "png-half", "png-corrupt", "png-bad-rows", "webp-cut"],
)
def test_corrupt_and_truncated_bytes_raise_data_error(data, reason):
    with pytest.raises(DataError, match=f"undecodable image.*{reason}"):
        ImageProcessor(CLIP_336, "pad").preprocess_bytes(data)


def test_uint8_resize_and_crop_then_normalize_is_preprocess():
    processor = ImageProcessor(CLIP_336, "pad")
    images = [torch.from_numpy(np.array(photo_like(w, h, seed=w))).permute(2, 0, 1) for w, h in [(50, 30), (30, 50)]]
    crops = torch.stack([processor.resize_and_crop(image) for image in images])
    assert crops.dtype == torch.uint8 and crops.shape == (2, 3, 336, 336)
    # A loader can ship uint8 batches (a quarter of the bytes) and normalise later, on any device.
    assert torch.equal(processor.normalize(crops), torch.stack([processor.preprocess(image) for image in images]))
    with pytest.raises(ValueError, match="uint8"):
        processor.normalize(crops.float())


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decompression_bombs_are_refused(monkeypatch, fmt):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 48 // 4)  # PIL refuses more than twice this
    with pytest.raises(DataError, match="image too large.*decompression bomb"):
        decode_image_tensor(_encoded(fmt))


@pytest.mark.parametrize("shape", SHAPES[:3] + SHAPES[-1:], ids=lambda s: f"{s[0]}x{s[1]}")
def test_pad_mode_equals_hf_llava_image_processor(shape):
    """What an exported model's processor (LlavaImageProcessor, do_pad) gives is what training saw."""
    from transformers import LlavaImageProcessor

    image = photo_like(*shape)
    hf = LlavaImageProcessor(
        do_pad=True, size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    expected = hf(images=image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(ImageProcessor(CLIP_336, "pad")(image), expected, rtol=0, atol=1e-6)
