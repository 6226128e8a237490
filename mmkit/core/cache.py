"""mmkit's on-disk cache: zoo models, prepared data and teachers' replies live under ``$MMKIT_HOME``,
each in a folder named after what determines its contents, built once and reused."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any, Callable

from mmkit.core.atomic_io import process_alive


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
    leaves a half-built cache behind (a killed build's folder is removed by the next build), and
    a finished one is reused.

    ``announce``: what is built and why, and roughly how long it takes; printed (with where it is
    cached) before a build, so a first run says what it is doing before its first progress bar."""
    if folder.is_dir():
        return folder
    if announce:
        print(f"{announce}; built once, cached in {folder}", file=sys.stderr, flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(folder)
    temporary = folder.with_name(f"{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        build(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    try:
        temporary.rename(folder)
    except OSError:
        # Another process finished the same folder first; its copy is identical.
        shutil.rmtree(temporary, ignore_errors=True)
    return folder


def _remove_dead_builds(folder: Path) -> None:
    """Remove the temporary folders that builds of ``folder`` killed on this host left behind.
    A build's folder names its host and process; one on another host (a shared file system) may
    still be running, so only this host's are judged, by whether their process is alive."""
    prefix = f"{folder.name}.tmp-{socket.gethostname()}-"
    for temporary in folder.parent.glob(f"{glob.escape(prefix)}*"):
        pid = temporary.name[len(prefix):]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(temporary, ignore_errors=True)
