"""Where model weights come from: a hub id, a local folder, or ``SCHEME://NAME`` served by a
registered resolver (mmkit's zoo registers ``zoo://``; a plugin may register its own)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from mmkit.core.errors import ConfigError
from mmkit.core.registry import load_components

_RESOLVERS: dict[str, Callable[[str], Path]] = {}


def register_resolver(scheme: str, resolve: Callable[[str], Path]) -> None:
    """``resolve(NAME)`` gives the local folder of ``SCHEME://NAME`` (building it if need be)."""
    _RESOLVERS[scheme] = resolve


def resolve_model_path(path: str) -> str:
    """Turn a configured model location into something ``from_pretrained`` accepts."""
    scheme, separator, name = path.partition("://")
    if not separator or "/" in scheme or "." in scheme:
        return path  # a hub id or a local folder
    if scheme not in _RESOLVERS:
        load_components()  # resolvers register as components load (mmkit's zoo, plugins)
    if scheme not in _RESOLVERS:
        known = ", ".join(f"{s}://" for s in sorted(_RESOLVERS)) or "none"
        raise ConfigError(f"{path}: no resolver for {scheme}:// (registered: {known})")
    return str(_RESOLVERS[scheme](name))
