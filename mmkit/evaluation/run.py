"""Run the configured evaluations on a model and write their results."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mmkit.data.images import ImageProcessor
from mmkit.evaluation.generation import AnswerGenerator
from mmkit.models.build import as_dict
from mmkit.models.vlm import VisionLanguageModel
from mmkit.registry import EVALUATORS, TEMPLATES, load_components


def check_evaluation(cfg: DictConfig) -> None:
    load_components()
    for task, node in cfg.evaluation.tasks.items():
        EVALUATORS.get(node.name, key=f"evaluation.tasks.{task}.name")


def evaluate_model(cfg: DictConfig, model: VisionLanguageModel, out_dir: Path) -> dict[str, dict[str, Any]]:
    """Each task's flat metrics; results.json, predictions.jsonl and table.md under out_dir/<task>/."""
    if not cfg.evaluation.tasks:
        return {}
    generator = AnswerGenerator(
        model.eval(),
        TEMPLATES.build(as_dict(cfg.template), "template"),
        ImageProcessor(model.encoder.image_stats, cfg.data.image_mode),
        batch_size=cfg.evaluation.batch_size,
        max_new_tokens=cfg.evaluation.max_new_tokens,
    )
    results = {}
    for task, node in cfg.evaluation.tasks.items():
        evaluator = EVALUATORS.build(as_dict(node), f"evaluation.tasks.{task}")
        result = evaluator.evaluate(generator)
        result.write(out_dir / task)
        print(f"\n{result.table}")
        results[task] = result.metrics
    return results
