"""mmkit's on-disk cache: zoo models, prepared data and teachers' replies live under ``$MMKIT_HOME``,
each in a folder named after what determines its contents, built once and reused."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable


def mmkit_home() -> Path:
    """Where mmkit caches what it builds (zoo models, prepared data): ``$MMKIT_HOME``."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmkit"
    return Path(os.environ.get("MMKIT_HOME", default))


def cache_folder(kind: str, identity: dict[str, Any]) -> Path:
    """A folder named after a hash of everything that determines its contents."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return mmkit_home() / "data" / f"{kind}-{digest}"


def build_once(folder: Path, build: Callable[[Path], None], announce: str | None = None) -> Path:
    """Run ``build(tmp)`` into a temporary folder and rename it to ``folder``: a crash never
    leaves a half-built cache behind, and a finished one is reused.

    ``announce``: what is built and why, and roughly how long it takes; printed (with where it is
    cached) before a build, so a first run says what it is doing before its first progress bar."""
    if folder.is_dir():
        return folder
    if announce:
        print(f"{announce}; built once, cached in {folder}", file=sys.stderr, flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    build(temporary)
    try:
        temporary.rename(folder)
    except OSError:
        # Another process finished the same folder first; its copy is identical.
        shutil.rmtree(temporary, ignore_errors=True)
    return folder
