"""Files that appear whole or not at all: a write goes to a temporary name beside its target and
is renamed into place, so a crash, a kill or a full disk never leaves half a file for a reader."""
from __future__ import annotations

import glob
import os
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s contents to; it becomes ``path`` when the block ends
    without an error, and is removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Host, pid and thread: concurrent writers of one target (threads of a client, ranks, hosts
    # sharing a file system) never share it, and a killed writer's leftover can be told apart.
    prefix = f".{path.name}.partial-{socket.gethostname()}-"
    _remove_dead_writers_files(path.parent, prefix)
    temporary = path.with_name(f"{prefix}{os.getpid()}-{threading.get_ident()}")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _remove_dead_writers_files(folder: Path, prefix: str) -> None:
    """Remove the temporary files that writers on this host left when they were killed (SIGKILL
    runs no cleanup), e.g. a pretraining checkpoint cut off mid-save, so they do not pile up."""
    for leftover in folder.glob(f"{glob.escape(prefix)}*"):
        pid = leftover.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            leftover.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def write_text_atomically(path: Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
