"""Load a trained model back from a run folder (what later commands take as ``model=PATH``)."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mmkit.core.errors import ConfigError
from mmkit.models.build import build_model
from mmkit.models.checkpoint_io import WEIGHTS, load_stage_weights
from mmkit.models.vlm import VisionLanguageModel


def load_run(run: str | Path) -> tuple[DictConfig, VisionLanguageModel]:
    """The run's composed config and its model with every stage's trained weights applied in order.

    ``run`` is a run folder, or one stage's checkpoint inside it (``RUN/<stage>/trainable.safetensors``):
    then the stages up to and including that one are applied.
    """
    run = Path(run)
    last_stage = None
    if run.is_file() and run.name == WEIGHTS:
        run, last_stage = run.parent.parent, run.parent.name
    config_path = run / ".hydra" / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"model={run}: not an mmkit run folder (no .hydra/config.yaml)")
    cfg = OmegaConf.load(config_path)
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


def resolve_device(name: str) -> torch.device:
    """``auto`` is cuda when available, else cpu; anything else as torch names it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device={name!r}: {exc}") from None
