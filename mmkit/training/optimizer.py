"""The AdamW that every stage trains with, from a stage's ``optimizer`` config block."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch


def build_adamw(parameters: Iterable[torch.nn.Parameter], cfg: Mapping[str, Any]) -> torch.optim.AdamW:
    """``cfg.fused``: null picks PyTorch's fused kernel where every trained weight is on a GPU. The
    default (foreach) implementation makes several passes over the fp32 states; on a 7B-shaped
    stage 2 it was a third of the step (experiments/bench/RESULTS.md)."""
    parameters = list(parameters)
    fused = cfg.get("fused")
    if fused is None:
        fused = bool(parameters) and all(p.is_cuda for p in parameters)
    return torch.optim.AdamW(
        parameters,
        lr=float(cfg["lr"]),
        weight_decay=float(cfg.get("weight_decay", 0.0)),
        betas=tuple(cfg.get("betas", (0.9, 0.999))),
        eps=float(cfg.get("eps", 1e-8)),
        fused=bool(fused),
    )
