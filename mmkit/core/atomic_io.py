"""Files that appear whole or not at all: a write goes to a temporary name beside its target and
is renamed into place, so a crash, a kill or a full disk never leaves half a file for a reader."""
from __future__ import annotations

import glob
import os
import re
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# A leftover this old, of a writer that is gone, is a killed write's: no save takes this long, and
# a live writer in another container that shares the host name keeps its file's time fresh.
_LEFTOVER_AGE_SECONDS = 600
_cleaned_folders: set[Path] = set()


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s contents to; it becomes ``path`` when the block ends
    without an error, and is removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Host, pid and thread: concurrent writers of one target (threads of a client, ranks, hosts
    # sharing a file system) never share it, and a killed writer's leftover can be told apart.
    marker = f".partial-{socket.gethostname()}-"
    if path.parent not in _cleaned_folders:  # once a folder per process: a folder of 10,000 images is not listed per image
        _remove_killed_writers_files(path.parent, marker)
        _cleaned_folders.add(path.parent)
    temporary = path.with_name(f".{path.name}{marker}{os.getpid()}-{threading.get_ident()}")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _remove_killed_writers_files(folder: Path, marker: str) -> None:
    """Remove the temporary files that writers on this host left when they were killed (SIGKILL
    runs no cleanup), e.g. a pretraining checkpoint cut off mid-save, so they do not pile up."""
    now = time.time()
    for leftover in folder.glob(f".*{glob.escape(marker)}*"):
        writer = re.fullmatch(r"(\d+)-(\d+)", leftover.name.rpartition(marker)[2])
        try:
            if writer and not process_alive(int(writer[1])) and now - leftover.stat().st_mtime > _LEFTOVER_AGE_SECONDS:
                leftover.unlink()
        except OSError:  # gone already, or another user's in a shared folder
            pass


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
