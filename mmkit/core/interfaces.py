"""What the model and data layers agree on, so neither has to import the other: the image
placeholder in conversation text and an encoder's expected pixel statistics."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# The placeholder LLaVA's records put where an image goes; each decoder's tokenizer gains it as
# one special token, expanded at data time into as many positions as the image has tokens.
IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class ImageStats:
    """What the image processor needs to know about an encoder's expected input."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``[..., 3, H, W]`` (on any device) -> float32 ``(x - 255 mean) / (255 std)``: rescale
        and normalise fused, in transformers' CLIP image processor's order of operations."""
        if pixels.dtype != torch.uint8:
            raise ValueError(f"expected uint8 pixels, got {pixels.dtype}")
        mean = torch.tensor(self.mean, dtype=torch.float32, device=pixels.device) * (1.0 / (1 / 255))
        std = torch.tensor(self.std, dtype=torch.float32, device=pixels.device) * (1.0 / (1 / 255))
        floats = pixels.to(torch.float32, memory_format=torch.contiguous_format)
        return floats.sub_(mean.view(3, 1, 1)).div_(std.view(3, 1, 1))
