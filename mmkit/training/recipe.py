"""Run a recipe: its stages in order, each a Lightning fit over its own data, each checkpointed."""
from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from mmkit.core.atomic_io import write_text_atomically
from mmkit.core.distributed import gather_objects
from mmkit.core.errors import ConfigError
from mmkit.core.registry import DATASETS, EVALUATORS, TEMPLATES
from mmkit.core.schema import check_ranges
from mmkit.data.datamodule import ShardDataModule
from mmkit.data.images import ImageProcessor
from mmkit.data.samples import SampleEncoder
from mmkit.inference.from_run import build_generator
from mmkit.models.build import as_dict, build_model, check_component_names
from mmkit.models.checkpoint_io import WEIGHTS, load_stage_weights, save_stage_weights
from mmkit.models.vlm import VisionLanguageModel
from mmkit.training.module import LitVLM
from mmkit.training.resume import (
    CHECKPOINTS,
    STAGE_DONE,
    checkpoint_callback,
    latest_checkpoint,
)
from mmkit.training.sample_answers import SampleAnswers
from mmkit.training.stages import configure_trainable, count_parameters
from mmkit.training.throughput import FlopModel, ThroughputMonitor
from mmkit.training.trainer import build_trainer, finish_loggers

PREVIOUS = "previous"


def check_recipe(cfg: DictConfig) -> None:
    """Every value is in range and every name in the recipe resolves, before anything heavy is built."""
    check_ranges(cfg)
    check_component_names(cfg)
    stages = cfg.recipe.stages
    if not stages:
        raise ConfigError("recipe.stages is empty: a recipe needs at least one stage")
    if cfg.decoder.get("lora", {}).get("enabled") and not any("decoder" in stage.train for stage in stages.values()):
        raise ConfigError(
            f"decoder.lora.enabled=true, but no stage of the recipe trains the decoder "
            f"(recipe.stages.*.train: {', '.join(f'{n}={list(s.train)}' for n, s in stages.items())}); "
            "the adapters would stay at their initialisation"
        )
    for name, stage in stages.items():
        key = f"recipe.stages.{name}"
        TEMPLATES.get(stage.template.name, key=f"{key}.template.name")
        DATASETS.get(stage.data.name, key=f"{key}.data.name")
        if stage.global_batch_size % stage.micro_batch_size:
            raise ConfigError(
                f"{key}.global_batch_size={stage.global_batch_size} is not a multiple of "
                f"{key}.micro_batch_size={stage.micro_batch_size}"
            )


def accumulation_steps(stage: DictConfig, key: str, world_size: int) -> int:
    per_step = stage.micro_batch_size * world_size
    if stage.global_batch_size % per_step:
        raise ConfigError(
            f"{key}.global_batch_size={stage.global_batch_size} is not divisible by "
            f"{key}.micro_batch_size={stage.micro_batch_size} x {world_size} device(s)"
        )
    return stage.global_batch_size // per_step


def _gather_counts(samples: int, skipped: list[tuple[str, str]]) -> tuple[int, list[tuple[str, str]]]:
    """Totals over all ranks (each rank read different shards)."""
    per_rank = gather_objects((samples, skipped))
    return sum(count for count, _ in per_rank), [item for _, items in per_rank for item in items]


def _init_connector(model: VisionLanguageModel, source: str | None, previous: Path | None, key: str) -> str | None:
    if source is None:
        return None
    path = previous if source == PREVIOUS else Path(source)
    if path is None:
        return None  # first stage of the recipe: the connector starts from its random init
    if not path.is_file() or not any(k.startswith("connector.") for k in _checkpoint_keys(path)):
        raise ConfigError(f"{key}.connector_from={source!r}: {path} is not a checkpoint with connector weights")
    load_stage_weights(model, path, only_prefix="connector.")
    return str(path)


def _checkpoint_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def _stage_data(cfg: DictConfig, stage: DictConfig, key: str, model: VisionLanguageModel) -> ShardDataModule:
    """The stage's shards, read through its template, the model's tokenizer and image processor."""
    template = TEMPLATES.build(as_dict(stage.template), f"{key}.template")
    template.check_tokenizer(model.tokenizer, f"{key}.template.name={stage.template.name} with decoder.path={cfg.decoder.get('path')}")
    sample_encoder = SampleEncoder(
        template,
        model.tokenizer,
        ImageProcessor(model.encoder.image_stats, cfg.data.image_mode),
        model.num_image_tokens,
        cfg.data.max_length,
    )
    return ShardDataModule(
        DATASETS.build(as_dict(stage.data), f"{key}.data"),
        sample_encoder,
        batch_size=stage.micro_batch_size,
        num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        seed=cfg.seed,
        batching=cfg.data.batching,
        pack_length=cfg.data.pack_length,
        group_batches=cfg.data.group_batches,
        prefetch_factor=cfg.data.prefetch_factor,
        pin_memory=cfg.trainer.accelerator != "cpu" and torch.cuda.is_available(),
    )


def _optimizer_steps(stage: DictConfig, datamodule: ShardDataModule, trainer: L.Trainer) -> int:
    """What Lightning's ``estimated_stepping_batches`` gives, without setting up the training data."""
    datamodule.setup("fit")
    batches = datamodule.batches_per_epoch(trainer.world_size)
    steps = max(int(stage.epochs), 1) * math.ceil(batches / trainer.accumulate_grad_batches)
    return min(steps, int(stage.max_steps)) if stage.max_steps > 0 else steps


def _write_skipped(path: Path, skipped: list[tuple[str, str]]) -> None:
    with open(path, "w") as handle:
        handle.writelines(json.dumps({"key": key, "reason": reason}) + "\n" for key, reason in skipped)


def _sample_answers(cfg: DictConfig, stage_name: str, run_dir: Path) -> SampleAnswers | None:
    """The stage's sample-answers callback: the first ``sample_answers.count`` items of an
    evaluation task; None when the count is 0 or no task is configured."""
    options = cfg.get("sample_answers")
    tasks = cfg.evaluation.get("tasks") or {}
    if not options or not options.count or not tasks:
        return None
    task = options.task or next(iter(tasks))
    if task not in tasks:
        raise ConfigError(f"sample_answers.task={task}: not one of evaluation.tasks ({', '.join(tasks)})")
    evaluator = EVALUATORS.build(as_dict(tasks[task]), f"evaluation.tasks.{task}")
    items = evaluator.items()[: int(options.count)]
    max_new_tokens = int(options.max_new_tokens)
    return SampleAnswers(evaluator, items, lambda model: build_generator(cfg, model, len(items), max_new_tokens),
                         run_dir, stage_name, int(options.every_n_steps))


def run_stage(
    cfg: DictConfig, name: str, model: VisionLanguageModel, run_dir: Path, previous: Path | None, resume: bool = False
) -> tuple[dict[str, Any], Path]:
    """Train one stage; with ``resume``, a finished stage is loaded instead of trained and an
    interrupted one continues from its newest checkpoint."""
    stage = cfg.recipe.stages[name]
    key = f"recipe.stages.{name}"
    stage_dir = run_dir / name
    if resume and (stage_dir / STAGE_DONE).is_file():
        load_stage_weights(model, stage_dir / WEIGHTS)
        print(f"resume: stage {name} finished earlier; its weights are loaded, not trained again", flush=True)
        return json.loads((stage_dir / STAGE_DONE).read_text()), stage_dir / WEIGHTS
    resume_from = latest_checkpoint(stage_dir) if resume else None
    stage_dir.mkdir(parents=True, exist_ok=True)
    connector_from = _init_connector(model, stage.get("connector_from"), previous, key)
    configure_trainable(model, list(stage.train), key=f"{key}.train")
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    trainable, total = count_parameters(model)

    datamodule = _stage_data(cfg, stage, key, model)
    throughput = ThroughputMonitor(FlopModel.of(model), cfg.peak_tflops)
    sample_answers = _sample_answers(cfg, name, run_dir)
    checkpointing = checkpoint_callback(stage_dir, int(cfg.checkpoint.every_n_steps), int(cfg.checkpoint.keep_last))
    trainer = build_trainer(
        as_dict(cfg.trainer), model, stage_dir, max_epochs=stage.epochs, max_steps=stage.max_steps,
        callbacks=[throughput, *([sample_answers] if sample_answers else [])], checkpointing=checkpointing,
        logger_cfg=as_dict(cfg.logger) if cfg.get("logger") else None,
    )
    # The world size is known only once the Trainer has resolved its devices.
    trainer.accumulate_grad_batches = accumulation_steps(stage, key, trainer.world_size)
    sample_log = stage_dir / f"samples.rank{trainer.global_rank}.txt" if cfg.log_sample_keys else None
    if sample_log is not None and resume_from is None:
        sample_log.unlink(missing_ok=True)  # a stage killed before its first checkpoint starts over
    lit = LitVLM(model, as_dict(stage.optimizer), as_dict(stage.schedule), sample_log=sample_log, guards=as_dict(cfg.guards),
                 total_steps=_optimizer_steps(stage, datamodule, trainer))

    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # Frozen towers sit in eval mode on purpose (no dropout); Lightning warns about that.
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
            if resume_from is not None:
                print(f"resume: stage {name} continues from {resume_from}", flush=True)
            trainer.fit(lit, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)
    except BaseException:
        finish_loggers(trainer)
        # A stage that stops early still leaves its skipped samples: the first thing to look at.
        rank = trainer.global_rank
        _write_skipped(stage_dir / ("skipped.jsonl" if rank == 0 else f"skipped.rank{rank}.jsonl"), lit.skipped)
        raise
    wall_time = time.perf_counter() - started
    finish_loggers(trainer)

    samples, skipped = _gather_counts(lit.samples_seen, lit.skipped)
    # The strategy assembles a full state dict even when FSDP shards the parameters.
    state = trainer.strategy.lightning_module_state_dict()
    state = {k.removeprefix("model."): v for k, v in state.items()}
    checkpoint = stage_dir / WEIGHTS
    summary = {
        "steps": trainer.global_step,
        "samples": samples,
        "final_loss": sum(lit.recent_losses) / len(lit.recent_losses) if lit.recent_losses else None,
        "final_loss_window": len(lit.recent_losses),
        "trainable_params": trainable,
        "total_params": total,
        "trained": list(stage.train),
        "connector_from": connector_from,
        "skipped_samples": len(skipped),
        "nonfinite_steps_skipped": lit.nonfinite_steps,
        "wall_time_s": round(wall_time, 2),
        "throughput": throughput.summary(),  # this rank's; every rank sees batches of the same size
        "global_batch_size": stage.global_batch_size,
        "world_size": trainer.world_size,
        "shards_sha256": datamodule.shards.sha256 if datamodule.shards else {},
        "teacher": datamodule.source.teacher(),  # who wrote the data, where its source knows
        "checkpoint": str(checkpoint.relative_to(run_dir)),
        "resumed_from": str(resume_from.relative_to(run_dir)) if resume_from else None,
    }
    if trainer.is_global_zero:
        save_stage_weights(state, trainable_names, stage_dir, meta={"stage": name, "trained": list(stage.train)})
        _write_skipped(stage_dir / "skipped.jsonl", skipped)
        write_text_atomically(stage_dir / STAGE_DONE, json.dumps(summary, indent=2))
        if not cfg.checkpoint.keep_after_stage:
            shutil.rmtree(stage_dir / CHECKPOINTS, ignore_errors=True)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # the next stage reads this checkpoint on every rank
    return summary, checkpoint


def run_recipe(cfg: DictConfig, run_dir: Path, resume: bool = False) -> tuple[dict[str, Any], VisionLanguageModel]:
    """Each stage's summary, and the model as the last stage left it. ``resume``: continue the
    run in ``run_dir`` (finished stages are loaded, the interrupted one resumes mid-epoch)."""
    check_recipe(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build_model(cfg)
    stages: dict[str, Any] = {}
    previous: Path | None = None
    for name in cfg.recipe.stages:
        stages[name], previous = run_stage(cfg, name, model, run_dir, previous, resume)
    return stages, model
