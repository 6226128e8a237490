"""The real architectures on PyTorch's ``meta`` device: every parameter's shape, no weights, no
download. A model named by a hub id is built from the config shipped in ``conf/hf_config``
(``openai/clip-vit-large-patch14-336`` -> ``openai--clip-vit-large-patch14-336.yaml``); a local
model folder from its own ``config.json``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig

from mmkit.core.config import CONF_DIR
from mmkit.core.errors import ConfigError
from mmkit.core.registry import CONNECTORS
from mmkit.models.build import as_dict
ZOO_SCHEME = "zoo://"
from mmkit.models.vlm import VisionLanguageModel

HF_CONFIG_DIR = CONF_DIR / "hf_config"


def hf_config(path: str, key: str) -> dict[str, Any]:
    """A model's HF config as a dict: a local folder's config.json (a ``zoo://`` model's cached
    folder), else the shipped copy."""
    if path.startswith(ZOO_SCHEME):
        from mmkit.zoo import model_folder, names

        name = path.removeprefix(ZOO_SCHEME)
        if name not in names():
            raise ConfigError(f"{key}={path}: unknown zoo model; available: {', '.join(sorted(names()))}")
        if not (model_folder(name) / "config.json").is_file():
            raise ConfigError(f"{key}={path}: this zoo model is not built yet, and planning builds nothing; "
                              f"build it first: python -m mmkit.zoo build {name}")
        path = str(model_folder(name))
    local = Path(path).expanduser()
    if (local / "config.json").is_file():
        config = json.loads((local / "config.json").read_text())
        return config.get("vision_config", config) if config.get("model_type") == "clip" else config
    shipped = HF_CONFIG_DIR / f"{path.replace('/', '--')}.yaml"
    if not shipped.is_file():
        known = sorted(p.stem.replace("--", "/") for p in HF_CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"{key}={path}: no config.json there and no shipped config for it; shipped: {', '.join(known)}")
    return yaml.safe_load(shipped.read_text())


def shapes_only_model(cfg: DictConfig, encoder_overrides: dict[str, Any] | None = None,
                      decoder_overrides: dict[str, Any] | None = None) -> VisionLanguageModel:
    """mmkit's model for ``cfg`` (a CLIP tower, the connector, a causal LM) with every parameter's
    shape and fresh weights, on the current default device: ``torch.device("meta")`` to count, a
    fake-tensor mode to trace a training step, a GPU to measure one. The overrides change the HF
    configs (``num_hidden_layers``: a reduced-depth model)."""
    from transformers import AutoConfig, CLIPVisionConfig

    from mmkit.models.decoders.hf_causal_lm import HFCausalLM
    from mmkit.models.encoders.hf_clip import HFCLIPEncoder

    if cfg.encoder.name != "hf_clip" or cfg.decoder.name != "hf_causal_lm":
        raise ConfigError(f"plan: encoder={cfg.encoder.name} / decoder={cfg.decoder.name}: planning knows "
                          "hf_clip encoders and hf_causal_lm decoders")
    encoder_dict = {**hf_config(cfg.encoder.path, "encoder.path"), **(encoder_overrides or {})}
    encoder_config = CLIPVisionConfig(**{k: v for k, v in encoder_dict.items() if k != "model_type"})
    decoder_dict = {**hf_config(cfg.decoder.path, "decoder.path"), **(decoder_overrides or {})}
    decoder_config = AutoConfig.for_model(decoder_dict.pop("model_type"), **decoder_dict)
    encoder = HFCLIPEncoder.from_config(encoder_config, layer=cfg.encoder.layer, select=cfg.encoder.select,
                                        frozen=cfg.encoder.frozen)
    decoder = HFCausalLM.from_config(decoder_config, attn_implementation=cfg.decoder.attn_implementation,
                                     gradient_checkpointing=cfg.decoder.gradient_checkpointing,
                                     lora=as_dict(cfg.decoder.lora) if cfg.decoder.get("lora") else None)
    connector = CONNECTORS.build(as_dict(cfg.connector), "connector", in_dim=encoder.hidden_size,
                                 out_dim=decoder.hidden_size)
    return VisionLanguageModel(encoder, connector, decoder)


def parameter_count(module: torch.nn.Module, trainable: bool | None = None) -> int:
    """Parameters of ``module``; only those that train (or only those that do not) if asked."""
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)
