"""The interface every vision encoder implements."""
from __future__ import annotations

import torch
from torch import nn

from mmkit.core.errors import ConfigError
from mmkit.core.interfaces import ImageStats
from mmkit.core.registry import ENCODERS

SELECT_CHOICES = ("patch", "cls_patch")


class VisionEncoder(nn.Module):
    """Images ``[B,3,H,W]`` -> features ``[B,N,D]`` taken from one hidden layer.

    ``layer`` indexes the hidden states the way transformers does: 0 is the embedding output,
    ``k`` the output of block ``k``, negative values count from the end (-1 last, -2 penultimate).
    """

    hidden_size: int
    image_stats: ImageStats
    num_patches: int
    num_prefix_tokens: int  # CLS and register tokens ahead of the patches
    num_blocks: int = 0  # transformer blocks, for counting attention FLOPs (0: not counted)

    def __init__(self, layer: int, select: str, frozen: bool) -> None:
        super().__init__()
        if select not in SELECT_CHOICES:
            raise ConfigError(f"encoder.select={select!r}: choose one of {', '.join(SELECT_CHOICES)}")
        self.layer = layer
        self.select = select
        self.frozen = frozen

    def _check_layer(self, num_blocks: int) -> int:
        """Validate ``self.layer`` against the model depth and return it as a non-negative index."""
        num_states = num_blocks + 1
        if not -num_states <= self.layer < num_states:
            raise ConfigError(
                f"encoder.layer={self.layer} is out of range: this encoder has {num_states} hidden "
                f"states (embeddings + {num_blocks} blocks), so use {-num_states}..{num_states - 1}"
            )
        return self.layer % num_states

    @property
    def num_tokens(self) -> int:
        """How many feature vectors one image yields."""
        return self.num_patches + (self.num_prefix_tokens if self.select == "cls_patch" else 0)

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VisionEncoder":
        # A frozen tower stays in eval mode (no dropout) even while the rest of the model trains.
        return super().train(mode and not self.frozen)

    def _select(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.select == "cls_patch" else hidden[:, self.num_prefix_tokens :]


ENCODERS.set_base(VisionEncoder)
