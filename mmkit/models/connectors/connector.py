"""The interface every connector implements."""
from __future__ import annotations

from torch import nn

from mmkit.core.registry import CONNECTORS


class Connector(nn.Module):
    """Maps encoder features ``[B,N,in_dim]`` to decoder embeddings ``[B,N',out_dim]``."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim

    def num_output_tokens(self, num_input_tokens: int) -> int:
        """How many embeddings come out for ``num_input_tokens`` features (resamplers change it)."""
        return num_input_tokens


CONNECTORS.set_base(Connector)
