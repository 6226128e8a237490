"""Train the embedded default with a perfect vision tower, to find what limits held-out accuracy.

    python experiments/oracle_tower.py                        # default recipe, oracle features
    python experiments/oracle_tower.py +encoder.conjunctions=true data.finetune.count=4000

The ``oracle`` encoder reads each image quadrant's object exactly from the rendered pixels
(colour by nearest palette entry, size by box width, shape by how much of its box it fills) and
gives one token per quadrant: one-hot colour, shape, size, empty flag and quadrant index, or with
``conjunctions`` one one-hot per (colour, shape, size). Nothing is lost in these features, so
whatever the run scores is the ceiling of the connector + LM path under the same recipe.
Any other ``python -m mmkit.train`` override applies.
"""
from __future__ import annotations

import sys

import torch

from mmkit.core.interfaces import ImageStats
from mmkit.core.registry import ENCODERS
from mmkit.models.encoders.vision_encoder import VisionEncoder
from mmkit.synth.world import COLOURS, SHAPES, SIZES

# The tiny CLIP's normalisation, so the same image processor feeds both towers.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32)
QUADRANT_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (row, column) in reading order
# Box fill ratios: square 1, circle pi/4, triangle 1/2.
SQUARE_MIN_FILL, CIRCLE_MIN_FILL = 0.9, 0.65
# A pixel differs from the background when its channels differ by this much in total.
FOREGROUND_THRESHOLD = 60
N_COLOURS, N_SHAPES, N_SIZES = len(COLOURS), len(SHAPES), len(SIZES)
EMPTY = N_COLOURS + N_SHAPES + N_SIZES
QUADRANT = EMPTY + 1
CONJUNCTION = QUADRANT + 4


@ENCODERS.register("oracle")
class OracleEncoder(VisionEncoder):
    def __init__(self, path: str | None = None, layer: int = -1, select: str = "patch", frozen: bool = True,
                 dtype: str | None = None, conjunctions: bool = False) -> None:
        super().__init__(layer, select, frozen)
        self.conjunctions = conjunctions
        self.hidden_size = CONJUNCTION + (N_COLOURS * N_SHAPES * N_SIZES if conjunctions else 0)
        self.num_patches = 4
        self.num_prefix_tokens = 0
        self.image_stats = ImageStats(size=64, mean=MEAN, std=STD)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
        pixels = (pixel_values.float().cpu() * std + mean) * 255
        half = pixels.shape[-1] // 2
        features = torch.zeros(pixels.shape[0], 4, self.hidden_size)
        for image_index, image in enumerate(pixels):
            background = image[:, 0, 0].view(3, 1, 1)
            for quadrant, (row, column) in enumerate(QUADRANT_CORNERS):
                block = image[:, row * half : (row + 1) * half, column * half : (column + 1) * half]
                features[image_index, quadrant] = self._token(block, background, quadrant, half)
        return features.to(pixel_values.device)

    def _token(self, block: torch.Tensor, background: torch.Tensor, quadrant: int, half: int) -> torch.Tensor:
        token = torch.zeros(self.hidden_size)
        token[QUADRANT + quadrant] = 1
        mask = (block - background).abs().sum(0) > FOREGROUND_THRESHOLD
        if not mask.any():
            token[EMPTY] = 1
            return token
        colour = int(((PALETTE - block[:, mask].mean(1)) ** 2).sum(1).argmin())
        ys, xs = mask.nonzero(as_tuple=True)
        width, height = int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)
        fill = float(mask.sum()) / (width * height)
        shape = SHAPES.index("square" if fill >= SQUARE_MIN_FILL else "circle" if fill >= CIRCLE_MIN_FILL else "triangle")
        size = int(width > 0.27 * 2 * half)  # the world's sides: 18% and 36% of the image
        if self.conjunctions:
            token[CONJUNCTION + (colour * N_SHAPES + shape) * N_SIZES + size] = 1
        else:
            token[colour] = token[N_COLOURS + shape] = token[N_COLOURS + N_SHAPES + size] = 1
        return token


if __name__ == "__main__":
    from mmkit.train import main

    sys.argv[1:1] = ["encoder.name=oracle", "encoder.path=null"]
    main()
