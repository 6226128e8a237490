"""Run evaluators: get each item's answer (from a model, resumably, or from an answer file),
score, write results.json / predictions.jsonl / table.md and print the table."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig

from mmkit.core.distributed import rank_and_world
from mmkit.core.registry import DATASETS, EVALUATORS, load_components
from mmkit.evaluation.answers import ANSWER_FILE, answer_items, read_answers
from mmkit.evaluation.evaluator import EvalItem, EvaluationResult, Evaluator
from mmkit.inference.from_run import build_generator
from mmkit.inference.generation import AnswerGenerator
from mmkit.models.build import as_dict
from mmkit.models.vlm import VisionLanguageModel


def check_evaluation(cfg: DictConfig) -> None:
    load_components()
    for task, node in cfg.evaluation.tasks.items():
        EVALUATORS.get(node.name, key=f"evaluation.tasks.{task}.name")


def run_task(
    name: str,
    evaluator: Evaluator,
    out_dir: Path,
    generator: AnswerGenerator | None = None,
    predictions: Path | None = None,
    items: Sequence[EvalItem] | None = None,
) -> EvaluationResult:
    """Score ``evaluator``'s items answered by ``generator`` (kept in out_dir/answers.jsonl, so a
    re-run resumes) or read from an existing answer file ``predictions``."""
    items = evaluator.items() if items is None else items
    if predictions is not None:
        answers = read_answers(predictions)
    elif generator is not None:
        answers = answer_items(items, generator, out_dir / ANSWER_FILE, desc=name)
    elif not evaluator.needs_answers:
        answers = {}
    else:
        raise ValueError("run_task needs a generator or a predictions file")
    return _score(name, evaluator, items, answers, out_dir)


def run_task_across_ranks(
    name: str, evaluator: Evaluator, out_dir: Path, generator: AnswerGenerator
) -> EvaluationResult | None:
    """``run_task`` with a model, by every rank of the process group together: each answers its
    share of the items, and rank 0 alone scores and writes what one process would have (the other
    ranks get None: scoring may ask a paid judge, once is enough)."""
    items = evaluator.items()
    answers = answer_items(items, generator, out_dir / ANSWER_FILE, desc=name, across_ranks=True)
    return _score(name, evaluator, items, answers, out_dir) if rank_and_world()[0] == 0 else None


def _score(
    name: str, evaluator: Evaluator, items: Sequence[EvalItem], answers: Mapping[str, str], out_dir: Path
) -> EvaluationResult:
    result = evaluator.score(items, answers)
    result.write(out_dir)
    print(f"\n{result.table}")
    figure = evaluator.plot(result, out_dir / "plot.png")
    if figure is not None:
        print(f"plot: {figure}")
    return result


def recipe_teachers(cfg: DictConfig) -> list[dict[str, Any]]:
    """Who wrote each stage's data, where its source knows (once each)."""
    teachers: list[dict[str, Any]] = []
    for name, stage in cfg.recipe.stages.items():
        record = DATASETS.build(as_dict(stage.data), f"recipe.stages.{name}.data").teacher()
        if record is not None and record not in teachers:
            teachers.append(record)
    return teachers


def evaluate_model(cfg: DictConfig, model: VisionLanguageModel, out_dir: Path) -> dict[str, dict[str, Any]]:
    """Each configured task's flat metrics; its files under out_dir/<task>/."""
    if not cfg.evaluation.tasks:
        return {}
    generator = build_generator(cfg, model, cfg.evaluation.batch_size, cfg.evaluation.max_new_tokens)
    results = {}
    teachers = recipe_teachers(cfg)
    for task, node in cfg.evaluation.tasks.items():
        evaluator = EVALUATORS.build(as_dict(node), f"evaluation.tasks.{task}")
        evaluator.record_teachers(teachers)
        results[task] = run_task(task, evaluator, out_dir / task, generator=generator).metrics
    return results
