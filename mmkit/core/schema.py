"""The typed shape of ``conf/config.yaml``: dataclasses in Hydra's ConfigStore that the YAML is
merged onto, so a wrong type fails at composition, naming the key, and the ranges no type can
express are checked by :func:`check_ranges` before anything is built.

Component groups (encoder, connector, decoder, template, data's datasets, trainer, evaluation)
stay open (``Any``): plugins add options with keys of their own, and their builders check them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from mmkit.core.errors import ConfigError

SCHEMA = "mmkit_schema"


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    connector_lr: Optional[float] = None
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    fused: Optional[bool] = None


@dataclass
class ScheduleConfig:
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0


@dataclass
class StageConfig:
    train: List[str] = field(default_factory=list)
    template: Any = None
    data: Any = None
    connector_from: Optional[str] = None
    epochs: int = 1
    max_steps: int = -1
    global_batch_size: int = 32
    micro_batch_size: int = 32
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class RecipeConfig:
    stages: Dict[str, StageConfig] = field(default_factory=dict)


@dataclass
class GuardsConfig:
    max_skip_fraction: float = 0.01
    min_samples_checked: int = 200
    max_nonfinite_steps: int = 5


@dataclass
class CheckpointConfig:
    every_n_steps: int = 50
    keep_last: int = 2
    keep_after_stage: bool = False


@dataclass
class SampleAnswersConfig:
    every_n_steps: int = 50
    count: int = 8
    task: Optional[str] = None
    max_new_tokens: int = 24


@dataclass
class ImageLimitsConfig:
    # mmkit.data.images.ImageLimits: images over these are skipped in training and evaluation
    max_side: int = 16384
    max_pixels: int = 50_000_000
    max_working_pixels: int = 67_108_864


@dataclass
class MmkitConfig:
    encoder: Any = None
    connector: Any = None
    decoder: Any = None
    template: Any = None
    data: Any = None
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    trainer: Any = None
    logger: Any = None
    evaluation: Any = None
    seed: int = 0
    guards: GuardsConfig = field(default_factory=GuardsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: Optional[str] = None
    peak_tflops: Optional[float] = None
    log_sample_keys: bool = False
    sample_answers: SampleAnswersConfig = field(default_factory=SampleAnswersConfig)
    image_limits: ImageLimitsConfig = field(default_factory=ImageLimitsConfig)
    # python -m mmkit.plan's own groups (conf/plan.yaml); training ignores them.
    hardware: Any = None
    plan: Any = None


def register() -> None:
    ConfigStore.instance().store(name=SCHEMA, node=MmkitConfig)


# (key, test, what it must be); keys under recipe.stages are checked for every stage.
_RANGES = [
    ("seed", lambda v: v >= 0, "a non-negative integer"),
    ("guards.max_skip_fraction", lambda v: 0.0 <= v <= 1.0, "a fraction in [0, 1]"),
    ("guards.min_samples_checked", lambda v: v >= 0, ">= 0"),
    ("guards.max_nonfinite_steps", lambda v: v >= 0, ">= 0 (0: never stop)"),
    ("checkpoint.every_n_steps", lambda v: v >= 0, ">= 0 (0: no checkpoints)"),
    ("checkpoint.keep_last", lambda v: v >= 1, ">= 1"),
    ("peak_tflops", lambda v: v is None or 0 < v < math.inf, "positive, or null"),
    ("sample_answers.every_n_steps", lambda v: v >= 0, ">= 0 (0: at the end of each stage only)"),
    ("sample_answers.count", lambda v: v >= 0, ">= 0 (0: none)"),
    ("sample_answers.max_new_tokens", lambda v: v >= 1, ">= 1"),
    ("image_limits.max_side", lambda v: v >= 1, "a positive number of pixels"),
    ("image_limits.max_pixels", lambda v: v >= 1, "a positive number of pixels"),
    ("image_limits.max_working_pixels", lambda v: v >= 1, "a positive number of pixels"),
    ("data.max_length", lambda v: isinstance(v, int) and v > 0, "a positive token count"),
    ("data.num_workers", lambda v: isinstance(v, int) and v >= 0, "a non-negative integer"),
    ("data.shuffle_buffer", lambda v: isinstance(v, int) and v >= 0, "a non-negative integer (0: no shuffling)"),
    ("data.group_batches", lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
    ("data.prefetch_factor", lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
]
_STAGE_RANGES = [
    ("epochs", lambda v: v >= 1, ">= 1"),
    ("max_steps", lambda v: v == -1 or v > 0, "-1 (the whole epochs) or positive"),
    ("global_batch_size", lambda v: v >= 1, ">= 1"),
    ("micro_batch_size", lambda v: v >= 1, ">= 1"),
    ("optimizer.lr", lambda v: 0 < v < math.inf, "positive and finite"),
    ("optimizer.connector_lr", lambda v: v is None or 0 < v < math.inf, "positive and finite, or null (the stage's lr)"),
    ("optimizer.weight_decay", lambda v: 0 <= v < math.inf, ">= 0 and finite"),
    ("optimizer.eps", lambda v: 0 < v < math.inf, "positive and finite"),
    ("optimizer.betas", lambda v: len(v) == 2 and all(0.0 <= b < 1.0 for b in v), "two numbers in [0, 1)"),
    ("schedule.warmup_ratio", lambda v: 0.0 <= v <= 1.0, "a fraction in [0, 1]"),
    ("schedule.min_lr_ratio", lambda v: 0.0 <= v <= 1.0, "a fraction in [0, 1]"),
]


def _value(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def check_ranges(cfg: DictConfig) -> None:
    """One line naming the first key whose value is out of its range."""
    checks = list(_RANGES) + [
        (f"recipe.stages.{name}.{key}", test, what) for name in cfg.recipe.stages for key, test, what in _STAGE_RANGES
    ]
    for key, test, what in checks:
        try:
            value = _value(cfg, key)
        except KeyError:
            continue  # an optional key this choice does not have
        if not test(value):
            raise ConfigError(f"{key}={value}: must be {what}")
