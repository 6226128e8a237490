"""Resumable checkpoints of a running stage, and finding the run a ``resume=`` continues.

A checkpoint is a folder written under a temporary name and renamed into place, so a kill at any
moment leaves either the whole checkpoint or none. It holds the stage's trainable weights as
safetensors (a connector-only stage writes only the connector, a LoRA stage only the adapters and
the connector) and everything else Lightning keeps (optimizer and scheduler states, loop counters,
the data position) with mmkit's counters and RNG states in ``state.pt``, which is read back with
``torch.load(weights_only=True)``: tensors and plain containers, never code. Its ``manifest.json``,
written last, gives the size and sha256 of both files. The rename guards against a kill mid-save;
the manifest catches what a rename cannot (a full disk, a crash before the data reached the disk, a
file cut short or overwritten later), and a resumption skips such a checkpoint for an older one.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file, save_file

from mmkit.core.atomic_io import write_text_atomically
from mmkit.core.errors import ConfigError

CHECKPOINTS = "checkpoints"
STAGE_DONE = "stage.json"  # a finished stage's summary; a resumed recipe does not run that stage again
RUN_DONE = "summary.json"  # written when a run ends
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"  # each file's size and sha256, written last
RUN_CONFIG = "run_config.yaml"
# Keys that may differ between a run and its resumption: where and whether to resume.
RESUME_FREE_KEYS = {"resume"}
# Hydra's default run folder is outputs/DATE/TIME: a run interrupted yesterday is in another DATE.
HYDRA_DATE_FOLDER = re.compile(r"\d{4}-\d{2}-\d{2}")


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
        manifest = {"files": {name: _file_record(partial / name) for name in (WEIGHTS_FILE, STATE_FILE)}}
        write_text_atomically(partial / MANIFEST_FILE, json.dumps(manifest, indent=2))
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


def _file_record(path: Path) -> dict[str, Any]:
    """A file's size and sha256, read in blocks: a checkpoint's state can be larger than memory."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
            size += len(block)
    return {"bytes": size, "sha256": digest.hexdigest()}


def checkpoint_damage(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None when its files match its manifest."""
    try:
        files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
        listed = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except FileNotFoundError:
        return f"it has no {MANIFEST_FILE}: its save did not finish, or an mmkit older than manifests wrote it"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {MANIFEST_FILE} is unreadable"
    for name in (WEIGHTS_FILE, STATE_FILE):
        if name not in listed:
            return f"its {MANIFEST_FILE} does not list {name}"
        if not (folder / name).is_file():
            return f"{name} is missing"
        size, sha256 = listed[name]
        found = _file_record(folder / name)
        if found["bytes"] != size:
            return f"{name} has {found['bytes']:,} bytes, its manifest says {size:,}"
        if found["sha256"] != sha256:
            return f"{name} does not match the sha256 in its manifest"
    return None


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
    """The newest intact checkpoint of a stage (see :func:`checkpoint_damage`), None if there is
    none. Newer damaged ones are skipped, and one line says which, why, and where the stage resumes
    instead: from the intact one, or, when none is left, from its beginning, as a stage killed
    before its first checkpoint does. The damaged folders stay for a look; the stage's own saves
    replace them as it reaches their steps again."""
    damaged: list[str] = []
    folders = sorted((p for p in (stage_dir / CHECKPOINTS).glob("step-*") if p.is_dir()), key=lambda p: p.name)
    for folder in reversed(folders):
        why = checkpoint_damage(folder)
        if why is None:
            if damaged:
                print(f"resume: stage {stage_dir.name}: {'; '.join(damaged)}; resuming from {folder.name}", flush=True)
            return folder
        damaged.append(f"checkpoint {folder.name} is damaged ({why})")
    if damaged:
        print(f"resume: stage {stage_dir.name}: {'; '.join(damaged)}; no intact checkpoint is left, "
              "so the stage starts again from its beginning", flush=True)
    return None


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
    """Whether a run folder holds progress that no finished run accounts for: a checkpoint or a
    finished stage, written after its ``summary.json`` if it has one. So a re-run in the folder of
    a run that finished, interrupted before its own end, is unfinished."""
    progress = _activity(run_dir)
    summary = run_dir / RUN_DONE
    if not summary.is_file():
        return bool(progress)
    finished = summary.stat().st_mtime_ns
    return any(written > finished for written in progress)


def _activity(run_dir: Path) -> list[int]:
    """When each checkpoint (each of its files, damaged or not) and finished stage of a run was written."""
    marks = [*run_dir.glob(f"*/{CHECKPOINTS}/step-*/*"), *run_dir.glob(f"*/{STAGE_DONE}")]
    return [mark.stat().st_mtime_ns for mark in marks]


def save_run_config(run_dir: Path, config: dict[str, Any]) -> None:
    """The config a run started with, kept apart from Hydra's copy, which a later start in the
    same folder overwrites before a resumption could compare against it."""
    write_text_atomically(run_dir / RUN_CONFIG, yaml.safe_dump(config, sort_keys=False))


def prepare_run_dir(run_dir: Path, config: dict[str, Any], resuming: bool) -> list[Path]:
    """Before a run starts in ``run_dir``: a resumption takes the folder as it is. A fresh start
    removes what an earlier run there left that a later ``resume=`` would read as this run's (its
    ``summary.json``, each stage's ``stage.json`` and checkpoints), then records its own config.
    Returns what it removed."""
    if resuming:
        return []
    # summary.json goes last: until then the folder reads as the finished run, never as an interrupted
    # one, to another rank deciding meanwhile whether to resume (torchrun starts all ranks at once).
    stale = [*run_dir.glob(f"*/{CHECKPOINTS}"), *run_dir.glob(f"*/{STAGE_DONE}"), *run_dir.glob(RUN_DONE)]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    save_run_config(run_dir, config)
    return stale


def resolve_run_dir(resume: str | None, new_run_dir: Path, current: dict[str, Any]) -> Path:
    """The folder this run writes to: ``new_run_dir``, or the unfinished run ``resume`` names.

    ``auto``: this run's own folder if it holds an unfinished run (a fixed ``hydra.run.dir``, a
    requeued job), else the newest unfinished run with the same config among the folders
    :func:`_beside` names, else a fresh start. A folder: that run, which must be unfinished and
    have this config.
    """
    if resume is None:
        return new_run_dir
    if resume == "auto":
        if is_unfinished(new_run_dir):
            _check_same_config(new_run_dir, current, "auto")
            return new_run_dir
        matching = [p for p in _beside(new_run_dir)
                    if is_unfinished(p) and _differences(p, current) == []]  # a run with no saved config is no match
        return max(matching, key=lambda p: max(_activity(p))) if matching else new_run_dir
    run_dir = Path(resume).expanduser().resolve()
    if not is_unfinished(run_dir):
        if (run_dir / RUN_DONE).exists():
            raise ConfigError(
                f"resume={resume}: that run finished (nothing there is newer than its {RUN_DONE}); nothing to resume"
            )
        raise ConfigError(f"resume={resume}: no checkpoint or finished stage there to resume from")
    _check_same_config(run_dir, current, resume)
    return run_dir


def _beside(run_dir: Path) -> list[Path]:
    """Where ``resume=auto`` looks for a run to continue: the folders beside ``run_dir`` and, when
    ``run_dir`` is Hydra's default ``outputs/DATE/TIME``, the TIME folders of every other DATE."""
    parent = run_dir.parent
    days = [parent]
    if HYDRA_DATE_FOLDER.fullmatch(parent.name):
        days += [p for p in parent.parent.glob("*") if p.is_dir() and HYDRA_DATE_FOLDER.fullmatch(p.name)]
    return [p for day in set(days) for p in day.glob("*") if p.is_dir() and p != run_dir]


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
