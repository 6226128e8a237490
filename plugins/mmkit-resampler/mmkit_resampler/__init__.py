"""A Perceiver resampler for mmkit: ``connector.name=perceiver_resampler``.

LLaVA hands every patch token to the LM (576 for ViT-L/14 at 336 px). A resampler (Flamingo's
Perceiver resampler, BLIP-2's Q-Former in spirit) lets ``num_latents`` learned queries attend to
the image features and hands only those to the LM: a fixed, smaller number of image tokens,
whatever the encoder gives. Attention over the image features carries no positions of its own,
so where things are must already be in the features (the encoder's position embeddings).
"""
from __future__ import annotations

import torch
from torch import nn

from mmkit.core.errors import ConfigError
from mmkit.core.registry import CONNECTORS
from mmkit.models.connectors.connector import Connector


class ResamplerBlock(nn.Module):
    """Latents attend to [image features; latents], then a feed-forward layer (both residual)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm_latents = nn.LayerNorm(width)
        self.norm_context = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.feed_forward = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        queries = self.norm_latents(latents)
        keys = torch.cat([self.norm_context(context), queries], dim=1)
        latents = latents + self.attention(queries, keys, keys, need_weights=False)[0]
        return latents + self.feed_forward(latents)


@CONNECTORS.register("perceiver_resampler")
class PerceiverResampler(Connector):
    def __init__(self, in_dim: int, out_dim: int, num_latents: int = 16, depth: int = 2, heads: int = 4,
                 width: int | None = None) -> None:
        super().__init__(in_dim, out_dim)
        width = width or out_dim
        if num_latents < 1 or depth < 1:
            raise ConfigError(f"connector: num_latents={num_latents} and depth={depth} must be at least 1")
        if width % heads:
            raise ConfigError(f"connector.heads={heads}: must divide the width {width} (connector.width)")
        self.num_latents = num_latents
        self.input_projection = nn.Linear(in_dim, width)
        self.latents = nn.Parameter(torch.randn(num_latents, width) * 0.02)
        self.blocks = nn.ModuleList(ResamplerBlock(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.output_projection = nn.Linear(width, out_dim)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return self.num_latents

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        context = self.input_projection(image_features)
        latents = self.latents.unsqueeze(0).expand(image_features.shape[0], -1, -1)
        for block in self.blocks:
            latents = block(latents, context)
        return self.output_projection(self.norm(latents))
