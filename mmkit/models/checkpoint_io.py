"""Stage checkpoints: the parameters a stage trained, as safetensors, plus what made them."""
from __future__ import annotations

import json
import zipfile
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


def load_torch_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a PyTorch ``.bin`` (a ``torch.save``d mapping of names to tensors), as other
    projects release their weights (LLaVA's ``mm_projector.bin``, sharded ``pytorch_model-*.bin``).

    Read with ``weights_only=True``: the restricted unpickler builds tensors and plain containers
    only, so a file holding any other object is refused before that object is made (a pickle can
    run code as it is read). What it does build must be names mapped to tensors; anything else is
    refused naming its key. ``what`` starts every error: the file, or the config key that named it.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what}: no such file")
    try:
        # mmap: a multi-gigabyte shard is paged in as its tensors are used, not read whole first;
        # only the zip format (torch.save's since 1.6) can be mapped.
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001  UnpicklingError, RuntimeError, EOFError... all mean "unreadable"
        raise ConfigError(f"{what}: not a tensor file that torch.load(weights_only=True) reads "
                          f"({_one_line(exc)})") from None
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"{what}: holds a {type(loaded).__name__}, not a mapping of names to tensors")
    for key, value in loaded.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ConfigError(f"{what}: key {key!r} is not a tensor ({type(value).__name__}); "
                              "mmkit reads only names mapped to tensors")
    return dict(loaded)


def _one_line(exc: BaseException) -> str:
    """The telling line of a multi-line error: torch's weights_only refusal explains over several
    lines how to load the file anyway, then names the object it refused, then how to allow that
    object; only the name says what is wrong, and mmkit offers neither way round."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    telling = [line.split(" Please use")[0] for line in lines if "WeightsUnpickler error" in line]
    return (telling or lines or [type(exc).__name__])[0]
