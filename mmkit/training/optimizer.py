"""The AdamW that every stage trains with, from a stage's ``optimizer`` config block, its parameter
groups and its schedule."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from mmkit.models.vlm import VisionLanguageModel

# Normalisation layers, whose weights take no weight decay. transformers' own RMSNorm classes
# (LlamaRMSNorm, Qwen2RMSNorm, ...) are plain nn.Modules, so they are known by their class name.
NORM_LAYERS = (torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.GroupNorm)
NORM_CLASS_SUFFIXES = ("LayerNorm", "RMSNorm")


def decays(module: torch.nn.Module, name: str) -> bool:
    """Whether weight decay applies to ``module``'s own parameter ``name``: to every weight but
    biases and normalisation layers' weights, as in transformers' Trainer, which LLaVA trains with
    (``get_decay_parameter_names``)."""
    is_norm = isinstance(module, NORM_LAYERS) or type(module).__name__.endswith(NORM_CLASS_SUFFIXES)
    return name != "bias" and not is_norm


def parameter_groups(model: VisionLanguageModel, cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``model``'s trainable parameters in AdamW's groups, as LLaVA's trainer makes them: the
    connector at ``cfg.connector_lr`` (LLaVA's ``mm_projector_lr``; null: ``cfg.lr``), the rest at
    ``cfg.lr``, and each split into the weights that decay by ``cfg.weight_decay`` and those that do
    not (:func:`decays`). The groups are always split and always in this order, whatever the values,
    so a stage resumed with another learning rate still matches its checkpoint's optimizer state;
    a group the stage's trainable set leaves empty is left out."""
    lr = float(cfg["lr"])
    connector_lr = lr if cfg.get("connector_lr") is None else float(cfg["connector_lr"])
    weight_decay = float(cfg.get("weight_decay", 0.0))
    groups = {
        (part, decay): {"name": f"{part}/{'decay' if decay else 'no_decay'}", "params": [],
                        "lr": connector_lr if part == "connector" else lr, "weight_decay": weight_decay if decay else 0.0}
        for part in ("other", "connector") for decay in (True, False)
    }
    connector = {id(p) for p in model.connector.parameters()}
    seen: set[int] = set()
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue  # frozen, or a tied weight already placed
            seen.add(id(parameter))
            part = "connector" if id(parameter) in connector else "other"
            groups[part, decays(module, name)]["params"].append(parameter)
    return [group for group in groups.values() if group["params"]]


def build_adamw(parameters: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
                cfg: Mapping[str, Any]) -> torch.optim.AdamW:
    """AdamW over ``parameters`` (plain, or the groups of :func:`parameter_groups`, whose own ``lr``
    and ``weight_decay`` win over ``cfg``'s). ``cfg.fused``: null picks PyTorch's fused kernel where
    every trained weight is on a GPU. The default (foreach) implementation makes several passes over
    the fp32 states, a large share of a full fine-tuning step (measured in experiments/bench/RESULTS.md)."""
    parameters = list(parameters)
    fused = cfg.get("fused")
    if fused is None:
        tensors = [p for item in parameters for p in (item["params"] if isinstance(item, dict) else [item])]
        fused = bool(tensors) and all(p.is_cuda for p in tensors)
    return torch.optim.AdamW(
        parameters,
        lr=float(cfg["lr"]),
        weight_decay=float(cfg.get("weight_decay", 0.0)),
        betas=tuple(cfg.get("betas", (0.9, 0.999))),
        eps=float(cfg.get("eps", 1e-8)),
        fused=bool(fused),
    )


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up, then cosine decay to ``min_ratio`` (LLaVA's schedule). Under
    ``LambdaLR`` it scales every parameter group's own peak learning rate."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
