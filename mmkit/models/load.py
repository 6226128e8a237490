"""Load a trained model back from a run folder (what later commands take as ``model=PATH``)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mmkit.errors import ConfigError
from mmkit.models.build import build_model
from mmkit.models.vlm import VisionLanguageModel
from mmkit.training.checkpoint import WEIGHTS, load_stage_weights


def load_run(run_dir: str | Path) -> tuple[DictConfig, VisionLanguageModel]:
    """The run's composed config and its model with every stage's trained weights applied in order."""
    run_dir = Path(run_dir)
    config_path = run_dir / ".hydra" / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"model={run_dir}: not an mmkit run folder (no .hydra/config.yaml)")
    cfg = OmegaConf.load(config_path)
    stages = [name for name in cfg.recipe.stages if (run_dir / name / WEIGHTS).is_file()]
    if not stages:
        raise ConfigError(f"model={run_dir}: no stage finished (no */{WEIGHTS})")
    model = build_model(cfg)
    for name in stages:
        load_stage_weights(model, run_dir / name / WEIGHTS)
    return cfg, model.eval()
