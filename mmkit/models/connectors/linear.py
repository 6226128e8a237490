"""LLaVA's connector: one trainable projection matrix W."""
from __future__ import annotations

import torch
from torch import nn

from mmkit.core.registry import CONNECTORS
from mmkit.models.connectors.connector import Connector


@CONNECTORS.register("linear")
class LinearConnector(Connector):
    def __init__(self, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__(in_dim, out_dim)
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.proj(image_features)
