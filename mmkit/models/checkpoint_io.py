"""Stage checkpoints: the parameters a stage trained, as safetensors, plus what made them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmkit.core.atomic_io import atomic_path
from mmkit.core.errors import ConfigError

WEIGHTS = "trainable.safetensors"


def save_stage_weights(state: Mapping[str, torch.Tensor], names: set[str], folder: Path, meta: dict[str, Any]) -> Path:
    """Write the tensors called ``names`` from ``state`` (a full model state dict) atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: state[name].detach().to("cpu").contiguous() for name in sorted(names)}
    path = folder / WEIGHTS
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata={"mmkit": json.dumps(meta)})
    return path


def load_stage_weights(model: nn.Module, path: Path, only_prefix: str | None = None) -> list[str]:
    """Load a stage checkpoint into ``model`` (optionally only keys under ``only_prefix``).

    Every key must exist in the model with the same shape: a checkpoint from another
    architecture fails here instead of silently loading nothing.
    """
    if not Path(path).is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001  safetensors raises its own error types
        # Never a fallback to torch.load: a pickle can run code when it is read.
        raise ConfigError(f"checkpoint {path} is not a safetensors file ({exc}); mmkit reads weights only as safetensors") from None
    if only_prefix is not None:
        tensors = {k: v for k, v in tensors.items() if k.startswith(only_prefix)}
    model_state = model.state_dict()
    unknown = [k for k in tensors if k not in model_state]
    mismatched = [k for k in tensors if k in model_state and model_state[k].shape != tensors[k].shape]
    if unknown or mismatched:
        raise ConfigError(
            f"checkpoint {path} does not fit this model: unknown keys {unknown[:3]}, "
            f"shape mismatches {mismatched[:3]} (was it trained with another encoder/connector/decoder?)"
        )
    model.load_state_dict(tensors, strict=False)
    return sorted(tensors)
