"""Load a trained model back from a run folder (what later commands take as ``model=PATH``)."""
from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mmkit.core.errors import ConfigError
from mmkit.models.build import build_model
from mmkit.models.checkpoint_io import WEIGHTS, load_stage_weights
from mmkit.models.vlm import VisionLanguageModel

# The config key that lets transformers import the Python files a model folder names in its
# config.json (``auto_map``), and so run them as the model loads.
TRUST_KEY = "trust_remote_code"


def load_run(run: str | Path, trust_remote_code: bool = False) -> tuple[DictConfig, VisionLanguageModel]:
    """The run's composed config and its model with every stage's trained weights applied in order.

    ``run`` is a run folder, or one stage's checkpoint inside it (``RUN/<stage>/trainable.safetensors``):
    then the stages up to and including that one are applied.

    ``trust_remote_code`` is the command line's, never the folder's: it replaces every
    ``trust_remote_code`` key of the saved config, because a folder that could allow itself to run
    code would run it on anyone who loads it.
    """
    if not isinstance(trust_remote_code, bool):  # "off" or "no" from a command line must not mean yes
        raise ConfigError(f"trust_remote_code={trust_remote_code!r}: give true or false")
    run = Path(run)
    last_stage = None
    if run.is_file() and run.name == WEIGHTS:
        run, last_stage = run.parent.parent, run.parent.name
    config_path = run / ".hydra" / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"model={run}: not an mmkit run folder (no .hydra/config.yaml)")
    cfg = OmegaConf.load(config_path)
    _command_decides_remote_code(cfg, trust_remote_code, run)
    stages = [name for name in cfg.recipe.stages if (run / name / WEIGHTS).is_file()]
    if last_stage is not None:
        if last_stage not in stages:
            raise ConfigError(f"model={run / last_stage / WEIGHTS}: {last_stage!r} is not a stage of this run's recipe")
        stages = stages[: stages.index(last_stage) + 1]
    if not stages:
        raise ConfigError(f"model={run}: no stage finished (no */{WEIGHTS})")
    model = build_model(cfg)
    for name in stages:
        load_stage_weights(model, run / name / WEIGHTS)
    return cfg, model.eval()


def _command_decides_remote_code(cfg: DictConfig, trust_remote_code: bool, run: Path) -> None:
    """Set every ``trust_remote_code`` key of ``cfg`` to the command's choice, and say in one line
    when the folder's own config asked for code the command did not allow."""
    found = list(_trust_keys(OmegaConf.to_container(cfg, resolve=False)))
    ignored = [f"{key}={'true' if value is True else value}" for key, value in found
               if value not in (False, None) and not trust_remote_code]
    for key, _ in found:
        OmegaConf.update(cfg, key, trust_remote_code, merge=False)
    if ignored:
        print(f"warning: model={run}: its config's {', '.join(ignored)} was ignored, so none of its Python files "
              f"run; if you trust them, add {TRUST_KEY}=true to the command (--trust-remote-code for "
              "python -m mmkit.export)", file=sys.stderr, flush=True)


def _trust_keys(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of each ``trust_remote_code`` key under ``node``, at any depth."""
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        where = f"{path}.{key}" if path else str(key)
        if key == TRUST_KEY:
            yield where, value
        else:
            yield from _trust_keys(value, where)


def resolve_device(name: str) -> torch.device:
    """``auto`` is cuda when available, else cpu; anything else as torch names it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device={name!r}: {exc}") from None
