"""Run a recipe: its stages in order, each a Lightning fit over its own data, each checkpointed."""
from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass
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
from mmkit.data.images import ImageLimits, ImageProcessor
from mmkit.data.samples import SampleEncoder
from mmkit.inference.from_run import build_generator
from mmkit.interchange.llava_original import load_llava_projector
from mmkit.models.build import as_dict, build_model, check_component_names
from mmkit.models.checkpoint_io import WEIGHTS, load_stage_weights, save_stage_weights
from mmkit.models.vlm import VisionLanguageModel
from mmkit.training.module import LitVLM
from mmkit.training.resume import CHECKPOINTS, STAGE_DONE, checkpoint_callback, latest_checkpoint
from mmkit.training.sample_answers import SampleAnswers
from mmkit.training.stages import configure_trainable, count_parameters
from mmkit.training.throughput import FlopModel, ThroughputMonitor
from mmkit.training.trainer import build_trainer, finish_loggers, shards_parameters

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


def _gather_counts(samples: int, truncated: int, skipped: list[tuple[str, str]]) -> tuple[int, int, list[tuple[str, str]]]:
    """Totals over all ranks (each rank read different shards)."""
    per_rank = gather_objects((samples, truncated, skipped))
    return (sum(count for count, _, _ in per_rank), sum(cut for _, cut, _ in per_rank),
            [item for _, _, items in per_rank for item in items])


def _init_connector(model: VisionLanguageModel, source: str | None, previous: Path | None, key: str) -> str | None:
    if source is None:
        return None
    path = previous if source == PREVIOUS else Path(source)
    if path is None:
        return None  # first stage of the recipe: the connector starts from its random init
    if path.suffix == ".bin":
        # LLaVA's released stage-1 projectors (mm_projector.bin), in LLaVA's parameter names.
        load_llava_projector(model, path, f"{key}.connector_from={source}")
        return str(path)
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
        ImageProcessor(model.encoder.image_stats, cfg.data.image_mode, ImageLimits.from_config(cfg.get("image_limits"))),
        model.num_image_tokens,
        cfg.data.max_length,
        too_long=cfg.data.too_long,
        leading_gpt_turn=cfg.data.leading_gpt_turn,
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


@dataclass(frozen=True)
class _Stage:
    """One stage of the recipe, as the steps of :func:`run_stage` need it."""

    name: str
    cfg: DictConfig  # recipe.stages.<name>
    key: str  # how error messages name the stage's settings
    dir: Path  # <run_dir>/<name>
    run_dir: Path  # the summary's paths are relative to it


@dataclass(frozen=True)
class _Trainable:
    """What the stage trains, fixed before the fit: the weights file keeps only these parameters."""

    names: set[str]
    count: int
    total: int
    connector_from: str | None


@dataclass(frozen=True)
class _StageFit:
    """What the fit runs on, and what the summary reads back from it afterwards."""

    trainer: L.Trainer
    lit: LitVLM
    datamodule: ShardDataModule
    throughput: ThroughputMonitor
    resume_from: Path | None


def run_stage(
    cfg: DictConfig, name: str, model: VisionLanguageModel, run_dir: Path, previous: Path | None, resume: bool = False
) -> tuple[dict[str, Any], Path]:
    """Train one stage; with ``resume``, a finished stage is loaded instead of trained and an
    interrupted one continues from its newest checkpoint."""
    stage = _Stage(name, cfg.recipe.stages[name], f"recipe.stages.{name}", run_dir / name, run_dir)
    if resume and (stage.dir / STAGE_DONE).is_file():
        return _load_finished_stage(model, stage)
    resume_from = latest_checkpoint(stage.dir) if resume else None
    stage.dir.mkdir(parents=True, exist_ok=True)
    trainable = _prepare_model(model, stage, previous)
    fit = _build_fit(cfg, stage, model, resume_from)
    wall_time = _run_fit(fit, stage)
    samples, truncated, skipped = _gather_counts(fit.lit.samples_seen, fit.lit.truncated, fit.lit.skipped)
    summary = _stage_summary(stage, fit, trainable, samples, truncated, len(skipped), wall_time)
    _save_stage(stage, fit.trainer, trainable.names, skipped, summary, bool(cfg.checkpoint.keep_after_stage))
    return summary, stage.dir / WEIGHTS


def _load_finished_stage(model: VisionLanguageModel, stage: _Stage) -> tuple[dict[str, Any], Path]:
    load_stage_weights(model, stage.dir / WEIGHTS)
    print(f"resume: stage {stage.name} finished earlier; its weights are loaded, not trained again", flush=True)
    return json.loads((stage.dir / STAGE_DONE).read_text()), stage.dir / WEIGHTS


def _prepare_model(model: VisionLanguageModel, stage: _Stage, previous: Path | None) -> _Trainable:
    """Load the connector the stage starts from, and freeze every part it does not train."""
    connector_from = _init_connector(model, stage.cfg.get("connector_from"), previous, stage.key)
    configure_trainable(model, list(stage.cfg.train), key=f"{stage.key}.train")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    count, total = count_parameters(model)
    return _Trainable(names, count, total, connector_from)


def _build_fit(cfg: DictConfig, stage: _Stage, model: VisionLanguageModel, resume_from: Path | None) -> _StageFit:
    datamodule = _stage_data(cfg, stage.cfg, stage.key, model)
    trainer, throughput = _stage_trainer(cfg, stage, model)
    lit = _lit_module(cfg, stage, model, trainer, datamodule, resuming=resume_from is not None)
    return _StageFit(trainer, lit, datamodule, throughput, resume_from)


def _stage_trainer(cfg: DictConfig, stage: _Stage, model: VisionLanguageModel) -> tuple[L.Trainer, ThroughputMonitor]:
    """The stage's Trainer with its callbacks; the throughput monitor is returned for the summary."""
    throughput = ThroughputMonitor(FlopModel.of(model), cfg.peak_tflops)
    sample_answers = _sample_answers(cfg, stage.name, stage.run_dir)
    checkpointing = checkpoint_callback(stage.dir, int(cfg.checkpoint.every_n_steps), int(cfg.checkpoint.keep_last))
    trainer = build_trainer(
        as_dict(cfg.trainer), model, stage.dir, max_epochs=stage.cfg.epochs, max_steps=stage.cfg.max_steps,
        callbacks=[throughput, *([sample_answers] if sample_answers else [])], checkpointing=checkpointing,
        logger_cfg=as_dict(cfg.logger) if cfg.get("logger") else None,
    )
    # The world size is known only once the Trainer has resolved its devices.
    trainer.accumulate_grad_batches = accumulation_steps(stage.cfg, stage.key, trainer.world_size)
    return trainer, throughput


def _lit_module(
    cfg: DictConfig, stage: _Stage, model: VisionLanguageModel, trainer: L.Trainer, datamodule: ShardDataModule,
    resuming: bool,
) -> LitVLM:
    """The LightningModule that trains ``model``; its schedule spans the stage's optimizer steps."""
    sample_log = stage.dir / f"samples.rank{trainer.global_rank}.txt" if cfg.log_sample_keys else None
    if sample_log is not None and not resuming:
        sample_log.unlink(missing_ok=True)  # a stage killed before its first checkpoint starts over
    total_steps = _optimizer_steps(stage.cfg, datamodule, trainer)
    return LitVLM(model, as_dict(stage.cfg.optimizer), as_dict(stage.cfg.schedule), sample_log=sample_log,
                  guards=as_dict(cfg.guards), total_steps=total_steps)


def _run_fit(fit: _StageFit, stage: _Stage) -> float:
    """Fit the stage, from its checkpoint when resuming; returns the wall time in seconds."""
    trainer, resume_from = fit.trainer, fit.resume_from
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # Frozen towers sit in eval mode on purpose (no dropout); Lightning warns about that.
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
            if resume_from is not None:
                print(f"resume: stage {stage.name} continues from {resume_from}", flush=True)
            trainer.fit(fit.lit, datamodule=fit.datamodule, ckpt_path=str(resume_from) if resume_from else None)
    except BaseException:
        finish_loggers(trainer)
        # A stage that stops early still leaves its skipped samples: the first thing to look at.
        rank = trainer.global_rank
        _write_skipped(stage.dir / ("skipped.jsonl" if rank == 0 else f"skipped.rank{rank}.jsonl"), fit.lit.skipped)
        raise
    wall_time = time.perf_counter() - started
    finish_loggers(trainer)
    return wall_time


def _stage_summary(
    stage: _Stage, fit: _StageFit, trainable: _Trainable, samples: int, truncated_samples: int, skipped_samples: int,
    wall_time: float,
) -> dict[str, Any]:
    """What ``stage.json`` holds; the sample counts are totals over all ranks."""
    trainer, lit, datamodule = fit.trainer, fit.lit, fit.datamodule
    return {
        "steps": trainer.global_step,
        "samples": samples,
        "final_loss": sum(lit.recent_losses) / len(lit.recent_losses) if lit.recent_losses else None,
        "final_loss_window": len(lit.recent_losses),
        "trainable_params": trainable.count,
        "total_params": trainable.total,
        "trained": list(stage.cfg.train),
        "connector_from": trainable.connector_from,
        "truncated_samples": truncated_samples,  # trained on their first data.max_length tokens (data.too_long)
        "skipped_samples": skipped_samples,
        "nonfinite_steps_skipped": lit.nonfinite_steps,
        "wall_time_s": round(wall_time, 2),
        "throughput": fit.throughput.summary(),  # this rank's; every rank sees batches of the same size
        "global_batch_size": stage.cfg.global_batch_size,
        "world_size": trainer.world_size,
        "shards_sha256": datamodule.shards.sha256 if datamodule.shards else {},
        "teacher": datamodule.source.teacher(),  # who wrote the data, where its source knows
        "checkpoint": str((stage.dir / WEIGHTS).relative_to(stage.run_dir)),
        "resumed_from": str(fit.resume_from.relative_to(stage.run_dir)) if fit.resume_from else None,
    }


def _save_stage(
    stage: _Stage, trainer: L.Trainer, trainable_names: set[str], skipped: list[tuple[str, str]],
    summary: dict[str, Any], keep_checkpoints: bool,
) -> None:
    """Rank 0 writes the stage's weights, its skipped samples and ``stage.json`` (last: it marks the
    stage finished), then drops the resumable checkpoints unless kept."""
    # The strategy assembles a full state dict even when FSDP shards the parameters: every rank takes part.
    state = trainer.strategy.lightning_module_state_dict()
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if trainer.is_global_zero:
        meta = {"stage": stage.name, "trained": list(stage.cfg.train)}
        save_stage_weights(state, trainable_names, stage.dir, meta=meta)
        _write_skipped(stage.dir / "skipped.jsonl", skipped)
        write_text_atomically(stage.dir / STAGE_DONE, json.dumps(summary, indent=2))
        if not keep_checkpoints:
            shutil.rmtree(stage.dir / CHECKPOINTS, ignore_errors=True)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # the next stage reads this checkpoint on every rank


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
        if shards_parameters(as_dict(cfg.trainer).get("strategy")):
            model = _unsharded_model(cfg, run_dir, list(stages))
    return stages, model


def _unsharded_model(cfg: DictConfig, run_dir: Path, finished: list[str]) -> VisionLanguageModel:
    """A fresh model with the finished stages' weights loaded in order, as a resumed run builds it.
    FSDP leaves the fitted model's layers wrapped and its parameters holding one rank's shard:
    the next stage's Trainer would not wrap it again, nor could it change what trains."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # what no stage trained (e.g. new tokens' embeddings) is drawn as the first time
        model = build_model(cfg)
    for name in finished:
        load_stage_weights(model, run_dir / name / WEIGHTS)
    return model
