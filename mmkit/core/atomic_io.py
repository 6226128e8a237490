"""Files that appear whole or not at all: a write goes to a temporary name beside its target and
is renamed into place, so a crash, a kill or a full disk never leaves half a file for a reader."""
from __future__ import annotations

import os
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
    # pid and thread: concurrent writers of one target (threads of a client, ranks) never share it.
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}-{threading.get_ident()}")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text_atomically(path: Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
