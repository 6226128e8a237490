"""LLaVA-1.5's connector family: ``mlp{N}x_gelu`` is N linear layers with GELU between them."""
from __future__ import annotations

import torch
from torch import nn

from mmkit.core.errors import ConfigError
from mmkit.core.registry import CONNECTORS
from mmkit.models.connectors.connector import Connector


class MLPConnector(Connector):
    def __init__(self, in_dim: int, out_dim: int, depth: int, bias: bool = True) -> None:
        super().__init__(in_dim, out_dim)
        if depth < 2:
            raise ConfigError(f"connector.name='mlp{depth}x_gelu': an MLP needs depth >= 2 (use 'linear' for 1)")
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim, bias=bias)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim, bias=bias)]
        self.layers = nn.Sequential(*layers)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.layers(image_features)


@CONNECTORS.register_family(r"mlp(?P<depth>\d+)x_gelu", "mlp{N}x_gelu")
def mlp_gelu(depth: str, in_dim: int, out_dim: int, bias: bool = True) -> MLPConnector:
    return MLPConnector(in_dim, out_dim, depth=int(depth), bias=bias)
