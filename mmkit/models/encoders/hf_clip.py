"""CLIP vision towers from transformers (``CLIPVisionModel.from_pretrained``), as in LLaVA."""
from __future__ import annotations

import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from mmkit.core.interfaces import ImageStats
from mmkit.core.registry import ENCODERS
from mmkit.models.encoders.vision_encoder import VisionEncoder
from mmkit.models.hub import resolve_model_path


@ENCODERS.register("hf_clip")
class HFCLIPEncoder(VisionEncoder):
    def __init__(
        self,
        path: str,
        layer: int = -2,
        select: str = "patch",
        frozen: bool = True,
        dtype: str | None = None,
    ) -> None:
        super().__init__(layer, select, frozen)
        local = resolve_model_path(path)
        # Check the layer against the config before reading gigabytes of weights.
        self.hidden_state_index = self._check_layer(CLIPVisionConfig.from_pretrained(local).num_hidden_layers)
        processor = CLIPImageProcessor.from_pretrained(local)
        # transformers 4.x gives a dict, 5.x a SizeDict with attributes.
        crop = processor.crop_size
        size = int(crop["height"] if isinstance(crop, dict) else crop.height)
        stats = ImageStats(size=size, mean=tuple(processor.image_mean), std=tuple(processor.image_std))
        self._attach(CLIPVisionModel.from_pretrained(local, dtype=getattr(torch, dtype) if dtype else None), stats)

    @classmethod
    def from_config(cls, config: CLIPVisionConfig, layer: int = -2, select: str = "patch",
                    frozen: bool = True) -> "HFCLIPEncoder":
        """The tower of ``config``'s shapes with fresh weights, on the current default device (the
        meta device or a fake-tensor mode for planning a run), with CLIP's own image statistics."""
        encoder = cls.__new__(cls)
        VisionEncoder.__init__(encoder, layer, select, frozen)
        encoder.hidden_state_index = encoder._check_layer(config.num_hidden_layers)
        stats = ImageStats(size=config.image_size, mean=tuple(OPENAI_CLIP_MEAN), std=tuple(OPENAI_CLIP_STD))
        encoder._attach(CLIPVisionModel(config), stats)
        return encoder

    def _attach(self, model: CLIPVisionModel, image_stats: ImageStats) -> None:
        config = model.config
        self.model = model
        self.hidden_size = config.hidden_size
        self.num_blocks = config.num_hidden_layers
        self.num_patches = (config.image_size // config.patch_size) ** 2
        self.num_prefix_tokens = 1
        self.image_stats = image_stats
        if self.frozen:
            self.freeze()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(self.model.dtype)
        outputs = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return self._select(outputs.hidden_states[self.hidden_state_index])
