"""Where model weights come from: a hub id, a local folder, or ``zoo://NAME`` (built by mmkit)."""
from __future__ import annotations

ZOO_SCHEME = "zoo://"


def resolve_model_path(path: str) -> str:
    """Turn a configured model location into something ``from_pretrained`` accepts.

    ``zoo://NAME`` names one of mmkit's own small models; it is built and cached on first use
    (see :mod:`mmkit.zoo`) and then loaded from disk like any downloaded checkpoint.
    """
    if path.startswith(ZOO_SCHEME):
        from mmkit.zoo import ensure_model

        return str(ensure_model(path[len(ZOO_SCHEME) :]))
    return path
