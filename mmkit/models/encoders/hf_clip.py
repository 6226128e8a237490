"""CLIP vision towers from transformers (``CLIPVisionModel.from_pretrained``), as in LLaVA."""
from __future__ import annotations

import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from mmkit.models.encoders.base import ImageStats, VisionEncoder
from mmkit.models.hub import resolve_model_path
from mmkit.registry import ENCODERS


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
        config = CLIPVisionConfig.from_pretrained(local)
        self.hidden_state_index = self._check_layer(config.num_hidden_layers)
        self.model = CLIPVisionModel.from_pretrained(local, dtype=getattr(torch, dtype) if dtype else None)
        self.hidden_size = config.hidden_size
        self.num_blocks = config.num_hidden_layers
        self.num_patches = (config.image_size // config.patch_size) ** 2
        self.num_prefix_tokens = 1
        processor = CLIPImageProcessor.from_pretrained(local)
        # transformers 4.x gives a dict, 5.x a SizeDict with attributes.
        crop = processor.crop_size
        size = int(crop["height"] if isinstance(crop, dict) else crop.height)
        self.image_stats = ImageStats(size=size, mean=tuple(processor.image_mean), std=tuple(processor.image_std))
        if frozen:
            self.freeze()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(self.model.dtype)
        outputs = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return self._select(outputs.hidden_states[self.hidden_state_index])
