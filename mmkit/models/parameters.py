"""Counting parameters, the one way every report, plan and log counts them."""
from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def parameter_count(parameters: nn.Module | Iterable[nn.Parameter], trainable: bool | None = None) -> int:
    """Elements of a module's parameters (each shared one once) or of the given ones; only those
    that train (``trainable=True``) or only those that do not (``False``) if asked."""
    if isinstance(parameters, nn.Module):
        parameters = parameters.parameters()
    return sum(p.numel() for p in parameters if trainable is None or p.requires_grad == trainable)
