"""CLIP vision towers from transformers (``CLIPVisionModel.from_pretrained``), as in LLaVA."""
from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModel, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from mmkit.core.interfaces import ImageStats
from mmkit.core.registry import ENCODERS
from mmkit.models.encoders.vision_encoder import VisionEncoder, check_feature_choice
from mmkit.models.hf_configs import read_hf_config
from mmkit.models.hub import resolve_model_path


class HFCLIPEncoder(VisionEncoder):
    """A CLIP vision tower read at one hidden layer. Config key ``encoder.name: hf_clip`` builds it
    with :meth:`from_pretrained` from the other keys."""

    def __init__(self, model: CLIPVisionModel, image_stats: ImageStats, layer: int = -2, select: str = "patch",
                 frozen: bool = True) -> None:
        config = model.config
        super().__init__(layer, select, frozen, num_blocks=config.num_hidden_layers)
        self.model = model
        self.hidden_size = config.hidden_size
        self.num_patches = (config.image_size // config.patch_size) ** 2
        self.num_prefix_tokens = 1
        self.image_stats = image_stats
        if frozen:
            self.freeze()

    @classmethod
    def from_pretrained(cls, path: str, layer: int = -2, select: str = "patch", frozen: bool = True,
                        dtype: str | None = None) -> "HFCLIPEncoder":
        """The tower and image statistics saved at ``path`` (a hub id, a folder, ``zoo://NAME``)."""
        local = resolve_model_path(path)
        # Check the layer against the config before reading gigabytes of weights.
        check_feature_choice(layer, select, CLIPVisionConfig.from_pretrained(local).num_hidden_layers)
        processor = CLIPImageProcessor.from_pretrained(local)
        # transformers 4.x gives a dict, 5.x a SizeDict with attributes.
        crop = processor.crop_size
        size = int(crop["height"] if isinstance(crop, dict) else crop.height)
        stats = ImageStats(size=size, mean=tuple(processor.image_mean), std=tuple(processor.image_std))
        model = CLIPVisionModel.from_pretrained(local, dtype=getattr(torch, dtype) if dtype else None)
        return cls(model, stats, layer, select, frozen)

    @classmethod
    def from_config(cls, config: CLIPVisionConfig, layer: int = -2, select: str = "patch", frozen: bool = True,
                    dtype: str | None = None) -> "HFCLIPEncoder":
        """The tower of ``config``'s shapes with fresh weights on the current default device, with
        CLIP's own image statistics."""
        stats = ImageStats(size=config.image_size, mean=tuple(OPENAI_CLIP_MEAN), std=tuple(OPENAI_CLIP_STD))
        options = {"dtype": getattr(torch, dtype)} if dtype else {}
        return cls(AutoModel.from_config(config, **options), stats, layer, select, frozen)

    @classmethod
    def with_fresh_weights(cls, config_overrides: dict[str, Any] | None = None, *, path: str, layer: int = -2,
                           select: str = "patch", frozen: bool = True, dtype: str | None = None) -> "HFCLIPEncoder":
        """:meth:`from_config` with the config read from ``path`` (no weights) and changed by
        ``config_overrides``."""
        fields = {**read_hf_config(path, "encoder.path"), **(config_overrides or {})}
        config = CLIPVisionConfig(**{k: v for k, v in fields.items() if k != "model_type"})
        return cls.from_config(config, layer, select, frozen, dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(self.model.dtype)
        outputs = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return self._select(outputs.hidden_states[self.hidden_state_index])


ENCODERS.register("hf_clip")(HFCLIPEncoder.from_pretrained)
