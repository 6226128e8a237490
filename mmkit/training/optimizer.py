"""The AdamW that every stage trains with, from a stage's ``optimizer`` config block, and its schedule."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch


def build_adamw(parameters: Iterable[torch.nn.Parameter], cfg: Mapping[str, Any]) -> torch.optim.AdamW:
    """``cfg.fused``: null picks PyTorch's fused kernel where every trained weight is on a GPU. The
    default (foreach) implementation makes several passes over the fp32 states, a large share of a
    full fine-tuning step (measured in experiments/bench/RESULTS.md)."""
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


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up, then cosine decay to ``min_ratio`` (LLaVA's schedule)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
