"""A generator for a run's model, prompted and fed images the way the model was trained."""
from __future__ import annotations

from omegaconf import DictConfig

from mmkit.core.registry import TEMPLATES
from mmkit.data.images import ImageLimits, ImageProcessor
from mmkit.inference.generation import AnswerGenerator
from mmkit.models.build import as_dict
from mmkit.models.vlm import VisionLanguageModel


def build_generator(
    cfg: DictConfig,
    model: VisionLanguageModel,
    batch_size: int,
    max_new_tokens: int,
    image_limits: ImageLimits | None = None,
) -> AnswerGenerator:
    """Answers prompted with the template and image processing the model was trained with;
    images over ``image_limits`` (default: the run's ``image_limits``) are refused."""
    image_limits = image_limits or ImageLimits.from_config(cfg.get("image_limits"))
    return AnswerGenerator(
        model.eval(),
        TEMPLATES.build(as_dict(cfg.template), "template"),
        ImageProcessor(model.encoder.image_stats, cfg.data.image_mode, image_limits),
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )
