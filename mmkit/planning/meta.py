"""What planning reads: configs only, and only those already here. A model named by a hub id is
planned from the config shipped in ``conf/hf_config``, a local folder from its own config.json, a
``zoo://`` model from its cached folder, which planning never builds (building one trains it)."""
from __future__ import annotations

from typing import Any, Mapping

from mmkit.core.errors import ConfigError
from mmkit.models.hf_configs import read_hf_config
from mmkit.zoo import names, present

ZOO_SCHEME = "zoo://"


def hf_config(path: str, key: str, gguf_file: str | None = None) -> dict[str, Any]:
    """The HF config of the model at ``path`` (config key ``key``), which must be here already."""
    if path.startswith(ZOO_SCHEME):
        name = path.removeprefix(ZOO_SCHEME)
        if name not in names():
            raise ConfigError(f"{key}={path}: unknown zoo model; available: {', '.join(sorted(names()))}")
        folder = present(name)
        if folder is None or not (folder / "config.json").is_file():
            raise ConfigError(f"{key}={path}: this zoo model is not built yet, and planning builds nothing; "
                              f"build it first: python -m mmkit.zoo build {name}")
    return read_hf_config(path, key, gguf_file)


def check_configs_here(cfg: Mapping[str, Any]) -> None:
    """Fail unless the HF config of every model ``cfg`` names by a path is here, so that building
    the model with fresh weights (:func:`mmkit.models.build.build_model`) builds nothing else."""
    for key in ("encoder", "decoder"):
        path = cfg[key].get("path")
        if path:
            hf_config(str(path), f"{key}.path", cfg[key].get("gguf_file"))
