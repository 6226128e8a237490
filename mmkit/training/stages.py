"""What trains in a stage: freeze the model, then unfreeze the parts the stage names."""
from __future__ import annotations

from typing import Sequence

from mmkit.core.errors import ConfigError
from mmkit.models.parameters import parameter_count
from mmkit.models.vlm import VisionLanguageModel

TRAINABLE_PARTS = ("encoder", "connector", "decoder")


def configure_trainable(model: VisionLanguageModel, parts: Sequence[str], key: str) -> None:
    """Make exactly ``parts`` trainable. Under LoRA, "decoder" means its adapters only."""
    unknown = [part for part in parts if part not in TRAINABLE_PARTS]
    if unknown or not parts:
        raise ConfigError(f"{key}={list(parts)}: list one or more of {', '.join(TRAINABLE_PARTS)}")
    model.requires_grad_(False)
    model.encoder.frozen = "encoder" not in parts
    if "encoder" in parts:
        model.encoder.requires_grad_(True)
    if "connector" in parts:
        model.connector.requires_grad_(True)
    if "decoder" in parts:
        lora_names = model.decoder.lora_parameter_names()
        for name, parameter in model.decoder.named_parameters():
            parameter.requires_grad_(not lora_names or name in lora_names)


def count_parameters(model: VisionLanguageModel) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    return parameter_count(model, trainable=True), parameter_count(model)
