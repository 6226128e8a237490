"""The interface every vision encoder implements."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmkit.core.errors import ConfigError
from mmkit.core.interfaces import ImageStats
from mmkit.core.registry import ENCODERS

SELECT_CHOICES = ("patch", "cls_patch")


def check_feature_choice(layer: int, select: str, num_blocks: int | None) -> None:
    """Fail on a ``select`` mode mmkit does not know, or a ``layer`` outside ``num_blocks`` + 1
    hidden states (not checked where the depth is unknown: ``None``)."""
    if select not in SELECT_CHOICES:
        raise ConfigError(f"encoder.select={select!r}: choose one of {', '.join(SELECT_CHOICES)}")
    if num_blocks is None:
        return
    num_states = num_blocks + 1
    if not -num_states <= layer < num_states:
        raise ConfigError(
            f"encoder.layer={layer} is out of range: this encoder has {num_states} hidden "
            f"states (embeddings + {num_blocks} blocks), so use {-num_states}..{num_states - 1}"
        )


class VisionEncoder(nn.Module):
    """Images ``[B,3,H,W]`` -> features ``[B,N,D]`` taken from one hidden layer.

    ``layer`` indexes the hidden states the way transformers does: 0 is the embedding output,
    ``k`` the output of block ``k``, negative values count from the end (-1 last, -2 penultimate).

    An encoder that can also be built without reading weights (for planning a run, or measuring
    one on random weights) overrides :meth:`with_fresh_weights`.
    """

    hidden_size: int
    image_stats: ImageStats
    num_patches: int
    num_prefix_tokens: int  # CLS and register tokens ahead of the patches
    num_blocks: int = 0  # transformer blocks, for counting attention FLOPs (0: not counted)

    def __init__(self, layer: int, select: str, frozen: bool, num_blocks: int | None = None) -> None:
        """``num_blocks``: the transformer's depth, against which ``layer`` is checked; encoders
        without hidden states to choose from leave it out."""
        super().__init__()
        check_feature_choice(layer, select, num_blocks)
        self.layer = layer
        self.select = select
        self.frozen = frozen
        if num_blocks is not None:
            self.num_blocks = num_blocks

    @classmethod
    def with_fresh_weights(cls, config_overrides: dict[str, Any] | None = None, **options: Any) -> "VisionEncoder":
        """The encoder its config keys ``options`` describe, with fresh weights on the current default
        device and nothing read but configs; ``config_overrides`` change its architecture's config."""
        raise ConfigError(f"{cls.__qualname__} is built from its weights only: it cannot be built with fresh "
                          "weights (weights='shapes' or 'none')")

    @property
    def hidden_state_index(self) -> int:
        """``layer`` as a non-negative index into the ``num_blocks + 1`` hidden states."""
        return self.layer % (self.num_blocks + 1)

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
