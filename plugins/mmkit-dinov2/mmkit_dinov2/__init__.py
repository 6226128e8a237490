"""DINOv2 vision towers for mmkit: ``encoder.name=dinov2`` (config option ``encoder=dinov2_small``).

timm's ``vit_{size}_patch14_reg4_dinov2``: a ViT with a CLS token and four *register* tokens
ahead of the patches. The registers hold no image place, so neither select mode passes them to
the connector: ``patch`` gives the patch tokens, ``cls_patch`` CLS + the patch tokens.
"""
from __future__ import annotations

import torch

from mmkit.core.errors import ConfigError
from mmkit.core.registry import ENCODERS
from mmkit.models.encoders.timm_vit import TimmViTEncoder

SIZES = ("small", "base", "large", "giant")
NUM_REGISTERS = 4


@ENCODERS.register("dinov2")
class DINOv2Encoder(TimmViTEncoder):
    def __init__(
        self,
        size: str = "small",
        img_size: int = 224,
        pretrained: bool = False,
        checkpoint_file: str | None = None,
        layer: int = -2,
        select: str = "patch",
        frozen: bool = True,
    ) -> None:
        if size not in SIZES:
            raise ConfigError(f"encoder.size={size!r}: choose one of {', '.join(SIZES)}")
        if img_size % 14:
            raise ConfigError(f"encoder.img_size={img_size}: DINOv2 uses 14-pixel patches; use a multiple of 14")
        super().__init__(
            model_name=f"vit_{size}_patch14_reg4_dinov2", pretrained=pretrained, checkpoint_file=checkpoint_file,
            layer=layer, select=select, frozen=frozen, model_kwargs={"img_size": img_size},
        )

    @property
    def num_tokens(self) -> int:
        return self.num_patches + (1 if self.select == "cls_patch" else 0)

    def _select(self, hidden: torch.Tensor) -> torch.Tensor:
        patches = hidden[:, self.num_prefix_tokens :]
        return torch.cat([hidden[:, :1], patches], dim=1) if self.select == "cls_patch" else patches
