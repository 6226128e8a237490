"""No projection: for encoders whose width already equals the decoder's."""
from __future__ import annotations

import torch

from mmkit.core.errors import ConfigError
from mmkit.core.registry import CONNECTORS
from mmkit.models.connectors.connector import Connector


@CONNECTORS.register("identity")
class IdentityConnector(Connector):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        if in_dim != out_dim:
            raise ConfigError(
                f"connector.name='identity' needs equal widths, but the encoder gives {in_dim} "
                f"and the decoder embeds {out_dim}; choose connector=linear or connector=mlp2x_gelu"
            )
        super().__init__(in_dim, out_dim)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return image_features
