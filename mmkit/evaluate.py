"""Evaluate a trained model, or score another system's answers, on a benchmark task.

    python -m mmkit.evaluate task=synthetic model=outputs/2026-11-26/12-00-00
    python -m mmkit.evaluate task=scienceqa model=RUN data_dir=ScienceQA/data/scienceqa
    python -m mmkit.evaluate task=scienceqa predictions=answers.jsonl data_dir=ScienceQA/data/scienceqa

A model's answers go to ``<out_dir>/answers.jsonl`` as they are made, so re-running the same
command after an interruption answers only what is left. Under ``torchrun --nproc_per_node N``
(or ``accelerate launch``) the N processes share the items, each on its own GPU, and rank 0 writes
what one process would have.
"""
from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mmkit.cli import hydra_command
from mmkit.core.errors import ConfigError


def evaluate(cfg: DictConfig) -> dict[str, float]:
    # Deferred: these import torch, transformers and Lightning; a bad command line is answered
    # before they load.
    from mmkit.core.distributed import launched_world_size
    from mmkit.core.registry import EVALUATORS, load_components
    from mmkit.evaluation.run import recipe_teachers, run_task
    from mmkit.inference.from_run import build_generator
    from mmkit.models.build import as_dict

    load_components()
    evaluator = EVALUATORS.build(as_dict(cfg.task), "task")
    if cfg.model is not None and cfg.predictions is not None:
        raise ConfigError("give one of model=RUN_FOLDER (a model answers) or predictions=ANSWERS.jsonl, not both")
    if cfg.model is None and launched_world_size() > 1:
        raise ConfigError("only a model's answering is shared across processes; score without model= in one process (no torchrun)")
    if cfg.model is None and cfg.predictions is None:
        if evaluator.needs_answers:
            raise ConfigError("give model=RUN_FOLDER (a model answers) or predictions=ANSWERS.jsonl")
        out_dir = Path(cfg.out_dir or HydraConfig.get().runtime.output_dir)
        return run_task(cfg.task.name, evaluator, out_dir).metrics
    if cfg.predictions is not None:
        out_dir = Path(cfg.out_dir or HydraConfig.get().runtime.output_dir)
        predictions, items = Path(cfg.predictions), evaluator.items()
        if cfg.ensemble.method is not None:
            predictions = _ensemble(cfg, evaluator, items, predictions, out_dir)
        return run_task(cfg.task.name, evaluator, out_dir, predictions=predictions, items=items).metrics
    if cfg.ensemble.method is not None:
        raise ConfigError("ensemble.method: ensembles combine answer files; give predictions=A.jsonl and ensemble.with=B.jsonl")
    from mmkit.core.distributed import join_launched_group, leave_group  # deferred with the rest, above
    from mmkit.evaluation.run import run_task_across_ranks
    from mmkit.models.load import load_run, resolve_device

    train_cfg, model = load_run(cfg.model, trust_remote_code=cfg.trust_remote_code)
    evaluator.record_teachers(recipe_teachers(train_cfg))
    out_dir = Path(cfg.out_dir or Path(cfg.model) / "eval" / cfg.task.name)
    if launched_world_size() == 1:
        model.to(resolve_device(cfg.device))
        generator = build_generator(train_cfg, model, cfg.batch_size, cfg.max_new_tokens)
        result = run_task(cfg.task.name, evaluator, out_dir, generator=generator)
    else:  # torchrun or accelerate launch: the ranks share the items, rank 0 scores
        try:
            model.to(join_launched_group(resolve_device(cfg.device)))
            generator = build_generator(train_cfg, model, cfg.batch_size, cfg.max_new_tokens)
            result = run_task_across_ranks(cfg.task.name, evaluator, out_dir, generator)
        finally:
            leave_group()
        if result is None:
            return {}
    print(f"results: {out_dir / 'results.json'}")
    return result.metrics


def _ensemble(cfg: DictConfig, evaluator, items, first: Path, out_dir: Path) -> Path:
    # Deferred, as in evaluate().
    from mmkit.evaluation.answers import read_answers
    from mmkit.evaluation.ensemble import combine, write_answers
    from mmkit.models.build import as_dict

    if cfg.ensemble.get("with") is None:
        raise ConfigError("ensemble.with: name the second answer file (B) to combine with predictions= (A)")
    judge = as_dict(cfg.ensemble.judge) if cfg.ensemble.get("judge") else None
    answers, counts = combine(cfg.ensemble.method, evaluator, items, read_answers(first),
                              read_answers(Path(cfg.ensemble["with"])), judge)
    print(f"ensemble {cfg.ensemble.method}: " + ", ".join(f"{key} {value}" for key, value in counts.items()))
    return write_answers(out_dir / f"answers_{cfg.ensemble.method}.jsonl", items, answers)


main = hydra_command("evaluate", evaluate)


if __name__ == "__main__":
    main()
