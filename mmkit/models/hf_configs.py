"""A model's HF config without its weights: a local folder's ``config.json`` (``SCHEME://NAME``
locations resolved to their folders first), else the copy shipped in ``conf/hf_config``
(``openai/clip-vit-large-patch14-336`` -> ``openai--clip-vit-large-patch14-336.yaml``), so that
hub models are known without a download."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoConfig

from mmkit.core.config import CONF_DIR
from mmkit.core.errors import ConfigError
from mmkit.models.hub import resolve_model_path

HF_CONFIG_DIR = CONF_DIR / "hf_config"


def read_hf_config(path: str, key: str, gguf_file: str | None = None) -> dict[str, Any]:
    """The HF config of the model at ``path`` (config key ``key``) as a dict; a CLIP folder gives
    its vision tower's part. With ``gguf_file``, the config is the one transformers reads from that
    GGUF file's metadata (a GGUF model folder has no config.json)."""
    # A zoo model built here is built on the CPU, as everywhere else, whatever device (meta, for
    # weights="none") the caller builds its model on.
    with torch.device("cpu"):
        local = Path(resolve_model_path(path, key)).expanduser()
    if gguf_file:
        return AutoConfig.from_pretrained(str(local), gguf_file=gguf_file).to_dict()
    if (local / "config.json").is_file():
        config = json.loads((local / "config.json").read_text())
        return config.get("vision_config", config) if config.get("model_type") == "clip" else config
    shipped = HF_CONFIG_DIR / f"{path.replace('/', '--')}.yaml"
    if not shipped.is_file():
        known = sorted(p.stem.replace("--", "/") for p in HF_CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"{key}={path}: no config.json there and no shipped config for it; shipped: {', '.join(known)}")
    return yaml.safe_load(shipped.read_text())
