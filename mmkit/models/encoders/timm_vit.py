"""Vision transformers from timm (``timm.create_model``), with the same layer/select semantics."""
from __future__ import annotations

from typing import Any

import torch

from mmkit.core.errors import ConfigError
from mmkit.core.interfaces import ImageStats
from mmkit.core.registry import ENCODERS
from mmkit.models.encoders.vision_encoder import VisionEncoder


@ENCODERS.register("timm_vit")
class TimmViTEncoder(VisionEncoder):
    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        checkpoint_file: str | None = None,
        layer: int = -2,
        select: str = "patch",
        frozen: bool = True,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """``pretrained: false`` builds the architecture with fresh weights, reading nothing."""
        kwargs = dict(model_kwargs or {})
        if checkpoint_file:
            # timm reads local weights through the pretrained-config overlay, no hub access.
            kwargs["pretrained_cfg_overlay"] = {"file": checkpoint_file}
            pretrained = True
        import timm  # here, not at the top: importing timm costs seconds that every command would pay

        try:
            model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **kwargs)
        except RuntimeError as exc:
            if "Unknown model" in str(exc):
                raise ConfigError(f"encoder.model_name={model_name!r}: {exc}") from None
            raise
        if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
            raise ConfigError(f"encoder.model_name={model_name!r} is not a timm VisionTransformer")
        super().__init__(layer, select, frozen, num_blocks=len(model.blocks))
        self.model = model
        self.hidden_size = model.embed_dim
        self.num_patches = model.patch_embed.num_patches
        self.num_prefix_tokens = model.num_prefix_tokens
        data_cfg = model.pretrained_cfg
        # The size the model was built for (model_kwargs.img_size), not the pretrained default.
        self.image_stats = ImageStats(
            size=int(model.patch_embed.img_size[-1]),
            mean=tuple(data_cfg.get("mean", (0.5,) * 3)),
            std=tuple(data_cfg.get("std", (0.5,) * 3)),
        )
        if frozen:
            self.freeze()

    @classmethod
    def with_fresh_weights(cls, config_overrides: dict[str, Any] | None = None, **options: Any) -> "TimmViTEncoder":
        """The encoder ``options`` configure, with ``pretrained`` off and no checkpoint file (subclasses
        that take these keys, as the dinov2 plugin, are built the same way)."""
        if config_overrides:
            raise ConfigError(f"encoder: {cls.__qualname__} takes no HF config overrides "
                              f"({', '.join(config_overrides)}); a timm model's architecture is set by its config keys")
        return cls(**{**options, "pretrained": False, "checkpoint_file": None})

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vit = self.model
        hidden = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(pixel_values))))
        # Blocks after the requested layer would be computed only to be thrown away.
        for block in vit.blocks[: self.hidden_state_index]:
            hidden = block(hidden)
        return self._select(hidden)
