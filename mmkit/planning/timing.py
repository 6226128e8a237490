"""Time of a stage from its data size, the FLOPs per sample and an assumed MFU.

FLOPs come from :class:`mmkit.training.throughput.FlopModel`, the counter behind the MFU every
training run logs, so a measured MFU and a planned time use one definition: a stage takes
``samples x epochs x FLOPs per sample / (GPUs x peak x MFU)``. Activation checkpointing's
recomputation is not model FLOPs (it shows as a lower MFU), as in the PaLM paper's definition.
"""
from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from mmkit.core.errors import ConfigError
from mmkit.models.vlm import VisionLanguageModel
from mmkit.training.throughput import FlopModel


@dataclass(frozen=True)
class StageTime:
    samples: int  # samples trained, all epochs
    flops_per_sample: float
    flops: float
    mfu: float
    hours: float


def stage_samples(cfg: DictConfig, stage: DictConfig, stage_key: str) -> tuple[int, DictConfig] | None:
    """(samples the stage trains on, the data size entry) from ``data.size.<stage>``; None where
    the data config does not say its size."""
    size = (cfg.data.get("size") or {}).get(stage_key)
    if not size:
        return None
    for key in ("samples", "mean_tokens"):
        if not size.get(key) or size[key] <= 0:
            raise ConfigError(f"data.size.{stage_key}.{key}: a positive number is needed to plan the time")
    if stage.max_steps > 0:
        return min(int(stage.max_steps) * int(stage.global_batch_size), int(size.samples) * int(stage.epochs)), size
    return int(size.samples) * int(stage.epochs), size


def stage_time(model: VisionLanguageModel, samples: int, size: DictConfig, gpus: int, peak_tflops: float,
               mfu: float) -> StageTime:
    """``model``'s trainable parts must be set as in the stage (the FLOPs depend on them)."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"plan.mfu: {mfu} is not a fraction in (0, 1]")
    flop_model = FlopModel.of(model)
    tokens = float(size.mean_tokens)
    per_sample = (flop_model.flops_per_image * float(size.get("image_share", 1.0))
                  + flop_model.flops_per_token * tokens + flop_model.flops_per_squared_token * tokens**2)
    flops = per_sample * samples
    seconds = flops / (gpus * peak_tflops * 1e12 * mfu)
    return StageTime(samples, per_sample, flops, mfu, seconds / 3600)
