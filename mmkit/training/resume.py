"""Resumable checkpoints of a running stage, and finding the run a ``resume=`` continues.

A checkpoint is a folder written under a temporary name and renamed into place, so a kill at any
moment leaves either the whole checkpoint or none. It holds the stage's trainable weights as
safetensors (a connector-only stage writes only the connector, a LoRA stage only the adapters and
the connector) and everything else Lightning keeps (optimizer and scheduler states, loop counters,
the data position) with mmkit's counters and RNG states in ``state.pt``, which is read back with
``torch.load(weights_only=True)``: tensors and plain containers, never code.
"""
from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file, save_file

from mmkit.core.errors import ConfigError

CHECKPOINTS = "checkpoints"
STAGE_DONE = "stage.json"  # a finished stage's summary; a resumed recipe does not run that stage again
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.pt"
RUN_CONFIG = "run_config.yaml"
# Keys that may differ between a run and its resumption: where and whether to resume.
RESUME_FREE_KEYS = {"resume"}


class SafeCheckpointIO(CheckpointIO):
    """Lightning's checkpoint I/O with weights in safetensors, the rest loaded weights-only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        rest = dict(checkpoint)
        weights = rest.pop("state_dict")
        save_file({name: tensor.detach().to("cpu").contiguous() for name, tensor in weights.items()},
                  str(partial / WEIGHTS_FILE))
        torch.save(rest, partial / STATE_FILE)
        if path.exists():  # the same step saved again: the old folder goes only once the new one is whole
            shutil.rmtree(path)
        os.replace(partial, path)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(path)
        if not (path / WEIGHTS_FILE).is_file() or not (path / STATE_FILE).is_file():
            raise ConfigError(f"resume: {path} is not an mmkit checkpoint folder ({WEIGHTS_FILE} + {STATE_FILE})")
        try:
            checkpoint = torch.load(path / STATE_FILE, map_location=map_location or "cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ConfigError(
                f"resume: {path / STATE_FILE} holds more than tensors and plain values, so it is not read "
                f"(a pickle can run code): {str(error).splitlines()[0]}"
            ) from None
        checkpoint["state_dict"] = load_file(str(path / WEIGHTS_FILE))
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        shutil.rmtree(path, ignore_errors=True)


def checkpoint_callback(stage_dir: Path, every_n_steps: int, keep_last: int) -> ModelCheckpoint | None:
    """Every ``every_n_steps`` optimizer steps, the newest ``keep_last`` kept; ``None`` if 0."""
    if every_n_steps <= 0:
        return None
    if keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last={keep_last}: keep at least 1 checkpoint, or set checkpoint.every_n_steps=0")
    return ModelCheckpoint(
        dirpath=stage_dir / CHECKPOINTS, filename="step-{step:07d}", auto_insert_metric_name=False,
        every_n_train_steps=every_n_steps, save_top_k=keep_last, monitor="step", mode="max",
        save_on_train_epoch_end=False, save_last=False, enable_version_counter=False,
    )


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The newest whole checkpoint of a stage (a ``.partial`` folder was cut off mid-write)."""
    folders = [p for p in (stage_dir / CHECKPOINTS).glob("step-*") if (p / STATE_FILE).is_file() and (p / WEIGHTS_FILE).is_file()]
    return max(folders, key=lambda p: p.name) if folders else None


def rng_states() -> dict[str, Any]:
    """Every generator a training step draws from, as tensors and plain values."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy = states["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached"]))
    python = states["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): tree}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The dotted keys whose values differ, apart from those a resumption may change."""
    before, after = _flatten(saved), _flatten(current)
    return sorted(key for key in before.keys() | after.keys()
                  if before.get(key) != after.get(key) and key.split(".")[0] not in RESUME_FREE_KEYS)


def is_unfinished(run_dir: Path) -> bool:
    if (run_dir / "summary.json").exists():
        return False
    return bool(_activity(run_dir))


def _activity(run_dir: Path) -> list[float]:
    """When each checkpoint and finished stage of a run was written."""
    marks = [*run_dir.glob(f"*/{CHECKPOINTS}/step-*/{STATE_FILE}"), *run_dir.glob(f"*/{STAGE_DONE}")]
    return [mark.stat().st_mtime for mark in marks]


def save_run_config(run_dir: Path, config: dict[str, Any]) -> None:
    """The config a run started with, kept apart from Hydra's copy, which a later start in the
    same folder overwrites before a resumption could compare against it."""
    path = run_dir / RUN_CONFIG
    if not path.exists():
        path.write_text(yaml.safe_dump(config, sort_keys=False))


def resolve_run_dir(resume: str | None, new_run_dir: Path, current: dict[str, Any]) -> Path:
    """The folder this run writes to: ``new_run_dir``, or the unfinished run ``resume`` names.

    ``auto``: this run's own folder if it holds an unfinished run (a fixed ``hydra.run.dir``, a
    requeued job), else the newest unfinished run with the same config among its sibling folders
    (Hydra's ``outputs/DATE/TIME`` layout), else a fresh start. A folder: that run, which must
    be unfinished and have this config.
    """
    if resume is None:
        return new_run_dir
    if resume == "auto":
        if is_unfinished(new_run_dir):
            _check_same_config(new_run_dir, current, "auto")
            return new_run_dir
        parent = new_run_dir.parent
        candidates = [p for p in {*parent.glob("*"), *parent.parent.glob("*/*")}
                      if p.is_dir() and p != new_run_dir and is_unfinished(p)]
        matching = [p for p in candidates if _differences(p, current) == []]  # a run with no saved config is no match
        return max(matching, key=lambda p: max(_activity(p))) if matching else new_run_dir
    run_dir = Path(resume).expanduser().resolve()
    if (run_dir / "summary.json").exists():
        raise ConfigError(f"resume={resume}: that run finished (it has summary.json); nothing to resume")
    if not is_unfinished(run_dir):
        raise ConfigError(f"resume={resume}: no checkpoint or finished stage there to resume from")
    _check_same_config(run_dir, current, resume)
    return run_dir


def _differences(run_dir: Path, current: dict[str, Any]) -> list[str] | None:
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        return None
    return config_differences(yaml.safe_load(path.read_text()), current)


def _check_same_config(run_dir: Path, current: dict[str, Any], resume: str) -> None:
    differences = _differences(run_dir, current)
    if differences is None:
        raise ConfigError(f"resume={resume}: {run_dir / RUN_CONFIG} is missing, so the run's config is unknown")
    if differences:
        raise ConfigError(
            f"resume={resume}: this config differs from the run's ({run_dir}) at {', '.join(differences[:8])}"
            f"{' ...' if len(differences) > 8 else ''}; resume with the run's own settings, or start a new run"
        )
