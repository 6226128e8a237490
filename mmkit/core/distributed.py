"""The few collectives mmkit needs outside Lightning's hooks, valid with or without a process group."""
from __future__ import annotations

from typing import Any

import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order; every rank must call it at the same point."""
    if not is_distributed():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values
