"""The real architectures on PyTorch's ``meta`` device: every parameter's shape, no weights, no
download. A model named by a hub id is built from the config shipped in ``conf/hf_config``
(``openai/clip-vit-large-patch14-336`` -> ``openai--clip-vit-large-patch14-336.yaml``); a local
model folder from its own ``config.json``."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig

from mmkit.config import CONF_DIR
from mmkit.errors import ConfigError
from mmkit.models.build import as_dict
from mmkit.registry import CONNECTORS

HF_CONFIG_DIR = CONF_DIR / "hf_config"


def hf_config(path: str, key: str) -> dict[str, Any]:
    """A model's HF config as a dict: a local folder's config.json, else the shipped copy."""
    local = Path(path).expanduser()
    if (local / "config.json").is_file():
        config = json.loads((local / "config.json").read_text())
        return config.get("vision_config", config) if config.get("model_type") == "clip" else config
    shipped = HF_CONFIG_DIR / f"{path.replace('/', '--')}.yaml"
    if not shipped.is_file():
        known = sorted(p.stem.replace("--", "/") for p in HF_CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"{key}={path}: no config.json there and no shipped config for it; shipped: {', '.join(known)}")
    return yaml.safe_load(shipped.read_text())


@dataclass
class MetaModel:
    """Parameter counts of the encoder, connector and decoder, and the shapes the plan needs."""

    encoder: torch.nn.Module
    connector: torch.nn.Module
    decoder: torch.nn.Module
    encoder_config: Any
    decoder_config: Any
    image_tokens: int

    def parameters(self, part: str) -> int:
        return sum(p.numel() for p in getattr(self, part).parameters())

    @property
    def total(self) -> int:
        return sum(self.parameters(part) for part in ("encoder", "connector", "decoder"))


def meta_model(cfg: DictConfig) -> MetaModel:
    """The configured encoder (a CLIP tower), connector and decoder (a causal LM), shapes only."""
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

    if cfg.encoder.name != "hf_clip" or cfg.decoder.name != "hf_causal_lm":
        raise ConfigError(f"plan: encoder={cfg.encoder.name} / decoder={cfg.decoder.name}: planning knows "
                          "hf_clip encoders and hf_causal_lm decoders")
    encoder_config = CLIPVisionConfig(**{k: v for k, v in hf_config(cfg.encoder.path, "encoder.path").items()
                                         if k != "model_type"})
    decoder_dict = dict(hf_config(cfg.decoder.path, "decoder.path"))
    decoder_config = AutoConfig.for_model(decoder_dict.pop("model_type"), **decoder_dict)
    with torch.device("meta"):
        encoder = CLIPVisionModel(encoder_config)
        decoder = AutoModelForCausalLM.from_config(decoder_config)
        connector = CONNECTORS.build(as_dict(cfg.connector), "connector", in_dim=encoder_config.hidden_size,
                                     out_dim=decoder_config.hidden_size)
    patches = (encoder_config.image_size // encoder_config.patch_size) ** 2
    image_tokens = patches + (1 if cfg.encoder.get("select", "patch") == "cls_patch" else 0)
    return MetaModel(encoder, connector, decoder, encoder_config, decoder_config, image_tokens)
